"""The judges' decode path, eager vs static loop: CPU seconds per steered generation of the organism's B on its
dev (40) and test (100) prompts, on the prefix cache, with a vector at the last prompt token (organism48's
steering settings, one thread), and whether both loops give the same token ids.

    PYTHONPATH=. python benchmarks/judge_decode.py [--vectors 6]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from timing import timed
from actors.steering import Steerer
from dfc_ray.interventions import generate_steered
from dfc_ray.spaces import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=6, help="steering vectors per prompt set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_spec("search_spaces/organism48.yaml")
    steerer, cfg = Steerer(spec.pair, spec.steering), spec.steering
    model, layer = steerer.model("b"), spec.layers[0]
    deltas = [torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(i)) * 15 * (i % 3)
              for i in range(args.vectors)]
    for name, tasks in zip(("dev", "test"), steerer._tasks(cfg)):
        prompts = steerer.prompts(tasks, cfg.protocol.prompt_format)
        base = steerer.generation(cfg.generation(), prompts)
        steerer.clean_replies("b", prompts, cfg.generation())  # fills the prefix cache, as a replica's first request
        ids = {}
        for mode in ("eager", "static"):
            gen = replace(base, decode=mode)
            generate_steered(model, steerer.tokenizer, prompts, gen, layer, deltas[0], prefix_cache=steerer.prefix["b"])
            ids[mode], _, cpu = timed(lambda: [[g.token_ids for g in generate_steered(
                model, steerer.tokenizer, prompts, gen, layer, d, prefix_cache=steerer.prefix["b"])] for d in deltas])
            print(f"{name} ({len(prompts)} prompts), {mode}: {cpu / len(deltas):.3f} CPU-s per generation")
        print(f"{name}: same token ids: {ids['eager'] == ids['static']}")


if __name__ == "__main__":
    main()
