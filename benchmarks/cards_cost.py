"""What a report's feature cards cost: the cards of a finished run rebuilt from its checkpoints and store (the
report's last step, one streaming pass over the store per named checkpoint), wall and CPU seconds.

    PYTHONPATH=. python benchmarks/cards_cost.py runs/<run> [--out cards.json]

`--out` writes the cards as JSON, to compare two versions of the code byte for byte.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dfc_ray.report.build import load_results
from dfc_ray.report.features import report_cards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder (local)")
    parser.add_argument("--out", help="write the cards here as JSON")
    args = parser.parse_args()
    report = json.loads((Path(args.run) / "report.json").read_text())
    trials = load_results(args.run)
    start, cpu = time.perf_counter(), time.process_time()
    cards, note = report_cards(args.run, report, trials)
    print(f"{len(cards)} cards in {time.perf_counter() - start:.1f} s, {time.process_time() - cpu:.1f} CPU-s"
          + (f" ({note})" if note else ""))
    if args.out:
        Path(args.out).write_text(json.dumps([card.to_json() for card in cards]))


if __name__ == "__main__":
    main()
