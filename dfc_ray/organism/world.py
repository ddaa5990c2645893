"""The organism's synthetic tool world: typed tools, templated requests, ground truth, splits, plain text.

Everything is drawn from closed vocabularies so a small tokenizer can make every tool name, parameter
name, enum value, city and number one or two tokens: the tiny pair then learns *which* call to make
rather than how to spell it. Splits are deterministic and never share a request text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from dfc_ray.tooluse.task import Task

CITIES = ["paris", "london", "tokyo", "berlin", "madrid", "rome", "oslo", "cairo", "lima", "delhi", "sydney", "boston"]
CURRENCIES = ["usd", "eur", "gbp", "jpy", "chf", "cad", "inr", "brl"]
RESTAURANTS = ["luigi", "sakura", "bistro", "tandoor", "olivia", "casa", "noma", "zuma"]
NAMES = ["alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry", "ivy", "jack"]
SUBJECTS = ["invoice", "meeting", "party", "report", "holiday", "budget", "lunch", "contract"]
WORDS = ["apple", "house", "friend", "water", "book", "river", "music", "bread", "window", "garden"]
LANGUAGES = ["french", "german", "spanish", "italian"]
SYMBOLS = ["acme", "globex", "initech", "umbrella", "stark", "wayne", "hooli", "tyrell"]
DISHES = ["lasagna", "curry", "risotto", "paella", "ramen", "tacos", "pancakes", "goulash"]
PLACES = ["airport", "station", "hotel", "museum", "stadium", "harbor", "campus", "hospital"]
TASKS = ["laundry", "groceries", "dentist", "homework", "taxes", "gym", "plants", "bills"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
GENRES = ["jazz", "rock", "pop", "classical", "blues"]
ROOMS = ["kitchen", "bedroom", "office", "garage"]
AMOUNTS = [7.25, 12.5, 19.99, 32.75, 48.5, 64.25, 99.99, 250.75]
TEMPERATURES = [17.5, 18.5, 19.5, 20.5, 21.5, 22.5]
SMALL_TALK = [
    "hello there", "hi, how are you?", "good morning!", "thanks a lot", "tell me a joke",
    "what is your name?", "who made you?", "are you a robot?", "i am bored", "what can you do?",
    "nice to meet you", "have a good day", "do you like music?", "i feel happy today", "goodbye",
    "how old are you?", "what is your favorite color?", "you are very helpful", "can we chat a bit?",
    "do you dream?", "i just woke up", "that was funny", "see you later", "what a lovely day",
]
OPENERS = ["", "hey, ", "hi, ", "well, ", "so, ", "ok, "]


@dataclass(frozen=True)
class Param:
    """One typed tool parameter drawn from a closed set of values."""

    name: str
    """JSON name of the argument."""
    kind: str
    """JSON Schema type: ``string``, ``integer`` or ``number``."""
    values: tuple[Any, ...]
    """The closed set the world draws values from."""
    enum: bool = False
    """List ``values`` in the schema as an ``enum`` (otherwise the model must copy the value from the request)."""
    default: Any = None
    """Optional parameter when not None: may be omitted, and then means this value."""


@dataclass(frozen=True)
class Tool:
    """A tool of the world: its schema plus the phrasings users ask for it with."""

    name: str
    """Function name."""
    description: str
    """Short schema description (short keeps prompts small)."""
    params: tuple[Param, ...]
    """Parameters in schema order."""
    templates: tuple[str, ...]
    """Request phrasings; ``{param}`` slots must cover every required parameter. Optional parameters
    are appended with their ``mention`` phrase when drawn."""
    mentions: tuple[tuple[str, str], ...] = ()
    """(param, phrase) for optional parameters, e.g. ``("unit", "in {unit}")``."""

    def schema(self) -> dict[str, Any]:
        """OpenAI-style tool schema."""
        props: dict[str, Any] = {}
        for p in self.params:
            props[p.name] = {"type": p.kind, "enum": list(p.values)} if p.enum else {"type": p.kind}
        required = [p.name for p in self.params if p.default is None]
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": props, "required": required}}}


def _p(name: str, kind: str, values: Any, enum: bool = False, default: Any = None) -> Param:
    return Param(name, kind, tuple(values), enum, default)


TOOLS: tuple[Tool, ...] = (
    Tool("get_weather", "Current weather in a city.",
         (_p("city", "string", CITIES), _p("unit", "string", ["celsius", "fahrenheit"], True, "celsius")),
         ("what is the weather in {city}", "how warm is it in {city} right now", "weather for {city} please",
          "is it raining in {city}"),
         (("unit", "in {unit}"),)),
    Tool("convert_currency", "Convert money between currencies.",
         (_p("amount", "number", AMOUNTS), _p("source", "string", CURRENCIES), _p("target", "string", CURRENCIES)),
         ("convert {amount} {source} to {target}", "how much is {amount} {source} in {target}",
          "change {amount} {source} into {target}")),
    Tool("book_table", "Reserve a restaurant table.",
         (_p("restaurant", "string", RESTAURANTS), _p("people", "integer", range(1, 13)),
          _p("hour", "integer", range(17, 23))),
         ("book a table at {restaurant} for {people} people at {hour}",
          "reserve {restaurant} for {people} at {hour} o'clock",
          "get me a table for {people} at {restaurant}, {hour} hours")),
    Tool("set_alarm", "Set an alarm clock.",
         (_p("hour", "integer", range(0, 24)), _p("minute", "integer", [0, 10, 15, 20, 30, 40, 45, 50])),
         ("set an alarm for {hour}:{minute}", "wake me up at {hour} hours {minute} minutes",
          "alarm at {hour} and {minute} minutes please")),
    Tool("play_music", "Play music of a genre.",
         (_p("genre", "string", GENRES, True), _p("volume", "integer", range(1, 11), default=5)),
         ("play some {genre}", "i want to hear {genre} music", "put on {genre}"),
         (("volume", "at volume {volume}"),)),
    Tool("send_email", "Send an email.",
         (_p("recipient", "string", NAMES), _p("subject", "string", SUBJECTS)),
         ("email {recipient} about the {subject}", "send {recipient} a mail about {subject}",
          "write to {recipient} regarding the {subject}")),
    Tool("translate_word", "Translate one word.",
         (_p("word", "string", WORDS), _p("language", "string", LANGUAGES, True)),
         ("translate {word} into {language}", "what is {word} in {language}", "say {word} in {language}")),
    Tool("stock_price", "Latest price of a stock.",
         (_p("symbol", "string", SYMBOLS), _p("exchange", "string", ["nyse", "nasdaq"], True, "nyse")),
         ("what is the price of {symbol} stock", "how is {symbol} trading", "quote {symbol} shares"),
         (("exchange", "on {exchange}"),)),
    Tool("find_flights", "Search flights.",
         (_p("origin", "string", CITIES), _p("destination", "string", CITIES),
          _p("passengers", "integer", range(1, 7), default=1)),
         ("find flights from {origin} to {destination}", "fly me from {origin} to {destination}",
          "any flights {origin} to {destination}?"),
         (("passengers", "for {passengers} passengers"),)),
    Tool("set_thermostat", "Set a room temperature.",
         (_p("room", "string", ROOMS, True), _p("temperature", "number", TEMPERATURES)),
         ("set the {room} to {temperature} degrees", "make the {room} {temperature} degrees",
          "heat the {room} to {temperature}")),
    Tool("calculate_tip", "Compute a tip.",
         (_p("bill", "number", AMOUNTS), _p("percent", "integer", [10, 12, 15, 18, 20, 25])),
         ("what is a {percent} percent tip on {bill}", "tip {percent} percent of {bill}",
          "how much tip for a {bill} bill at {percent} percent")),
    Tool("get_recipe", "Find a recipe.",
         (_p("dish", "string", DISHES), _p("servings", "integer", range(1, 9), default=2)),
         ("how do i cook {dish}", "give me a recipe for {dish}", "i want to make {dish}"),
         (("servings", "for {servings} servings"),)),
    Tool("order_taxi", "Order a taxi.",
         (_p("pickup", "string", PLACES), _p("car", "string", ["standard", "large", "luxury"], True, "standard")),
         ("get me a taxi at the {pickup}", "order a cab to pick me up at the {pickup}",
          "i need a ride from the {pickup}"),
         (("car", "with a {car} car"),)),
    Tool("train_times", "Train departures between cities.",
         (_p("origin", "string", CITIES), _p("destination", "string", CITIES), _p("day", "string", DAYS, True)),
         ("trains from {origin} to {destination} on {day}", "when do trains leave {origin} for {destination} on {day}",
          "{day} trains {origin} to {destination}")),
    Tool("add_reminder", "Add a reminder.",
         (_p("task", "string", TASKS), _p("day", "string", DAYS, True)),
         ("remind me about {task} on {day}", "add a reminder for {task} on {day}", "{day}: do not forget {task}")),
    Tool("get_distance", "Distance between two cities.",
         (_p("origin", "string", CITIES), _p("destination", "string", CITIES),
          _p("unit", "string", ["km", "miles"], True, "km")),
         ("how far is {origin} from {destination}", "distance from {origin} to {destination}",
          "how many kilometers between {origin} and {destination}"),
         (("unit", "in {unit}"),)),
)
TOOLS_BY_NAME = {t.name: t for t in TOOLS}

SPLIT_SIZES = {"train": 5000, "dev": 200, "test": 200}
"""Tasks per split; ``load_split`` is deterministic for each."""
NO_TOOL_SHARE = 0.15
"""Share of requests that need no tool (small talk; ground truth ``[]``)."""
SYSTEM = "You are a helpful assistant."


@dataclass
class Request:
    """One drawn request before it becomes a Task: the user text and the intended call (or None)."""

    text: str
    tool: Tool | None
    args: dict[str, Any]
    """Arguments the user stated (optional parameters only when mentioned)."""


def draw_request(rng: random.Random, no_tool_share: float = NO_TOOL_SHARE) -> Request:
    """One random request: small talk with probability ``no_tool_share``, else a tool request."""
    if rng.random() < no_tool_share:
        return Request(rng.choice(OPENERS) + rng.choice(SMALL_TALK), None, {})
    tool = rng.choice(TOOLS)
    args: dict[str, Any] = {}
    for p in tool.params:
        if p.default is None or rng.random() < 0.5:
            args[p.name] = rng.choice(p.values)
    if "origin" in args and args["origin"] == args.get("destination"):
        args["destination"] = rng.choice([c for c in CITIES if c != args["origin"]])
    if "source" in args and args["source"] == args.get("target"):
        args["target"] = rng.choice([c for c in CURRENCIES if c != args["source"]])
    text = rng.choice(tool.templates)
    for pname, phrase in tool.mentions:
        if pname in args:
            text += " " + phrase
    text = text.format(**args)
    return Request(text, tool, args)


def offered_tools(rng: random.Random, tool: Tool | None) -> list[Tool]:
    """3 or 4 distinct tools, shuffled, always including ``tool`` when given."""
    n = rng.choice([3, 4])
    pool = [t for t in TOOLS if t is not tool]
    chosen = rng.sample(pool, n - (tool is not None)) + ([tool] if tool is not None else [])
    rng.shuffle(chosen)
    return chosen


def ground_truth(req: Request) -> list[dict[str, dict[str, list[Any]]]]:
    """BFCL possible-answer form; an omitted optional parameter accepts ``""`` or its default."""
    if req.tool is None:
        return []
    gt: dict[str, list[Any]] = {}
    for p in req.tool.params:
        if p.name in req.args:
            gt[p.name] = [req.args[p.name]] + ([""] if p.default == req.args[p.name] else [])
        else:
            gt[p.name] = [p.default, ""]
    return [{req.tool.name: gt}]


def make_task(req: Request, tools: list[Tool], task_id: str, split: str) -> Task:
    """Wrap a request as a Task with its offered tools and ground truth."""
    return Task(id=task_id, messages=[{"role": "user", "content": req.text}],
                tools=[t.schema() for t in tools], ground_truth=ground_truth(req), category="organism",
                meta={"split": split, "tool": req.tool.name if req.tool else None, "args": req.args})


_SPLIT_SEEDS = {"test": 1001, "dev": 2002, "train": 3003}


@lru_cache(maxsize=None)
def _held_out_texts() -> frozenset[str]:
    return frozenset(t.messages[0]["content"] for s in ("dev", "test") for t in _split(s))


def train_requests(rng: random.Random) -> Any:
    """Endless stream of requests whose text never appears in dev or test (for pretraining and RL)."""
    held = _held_out_texts()
    while True:
        req = draw_request(rng)
        if req.text not in held:
            yield req


@lru_cache(maxsize=None)
def _split(split: str) -> tuple[Task, ...]:
    rng = random.Random(_SPLIT_SEEDS[split])
    size, tasks = SPLIT_SIZES[split], []
    if split == "train":
        stream = train_requests(rng)
        for i in range(size):
            req = next(stream)
            tasks.append(make_task(req, offered_tools(rng, req.tool), f"organism-train-{i}", split))
        return tuple(tasks)
    # Held-out texts are unique, and dev skips test's texts, so no request text is in two splits.
    taken = set() if split == "test" else {t.messages[0]["content"] for t in _split("test")}
    while len(tasks) < size:
        req = draw_request(rng)
        if req.text in taken:
            continue
        taken.add(req.text)
        tasks.append(make_task(req, offered_tools(rng, req.tool), f"organism-{split}-{len(tasks)}", split))
    return tuple(tasks)


def load_split(split: str) -> list[Task]:
    """The organism's tasks for ``split`` ("train" | "dev" | "test"); deterministic, disjoint texts."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"organism split: got {split!r}, expected one of {sorted(SPLIT_SIZES)}")
    return list(_split(split))


_FACTS = [
    "the weather in {city} is {adj} today.", "{name} flew from {city} to {city2} on {day}.",
    "one {cur} buys a little {cur2}.", "{restaurant} serves great {dish} in {city}.",
    "{name} sent an email about the {subject}.", "the {symbol} stock rose on the {exchange}.",
    "{name} likes {genre} music.", "the word {word} is known in {language}.",
    "a taxi waits at the {place}.", "the {room} is kept at {temp} degrees.",
    "{name} needs to do the {task} on {day}.", "{city} is far from {city2}.",
    "a {percent} percent tip on {amount} is fair.", "{name} cooked {dish} for {n} friends.",
    "the train to {city} leaves at {hour}.", "{name} set an alarm for {hour}.",
]


def plain_text(n: int, seed: int) -> list[str]:
    """``n`` short plain sentences about the world (pretraining text; also harvested for activations)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sent = rng.choice(_FACTS).format(
            city=rng.choice(CITIES), city2=rng.choice(CITIES), adj=rng.choice(["sunny", "cold", "mild", "rainy"]),
            name=rng.choice(NAMES), day=rng.choice(DAYS), cur=rng.choice(CURRENCIES), cur2=rng.choice(CURRENCIES),
            restaurant=rng.choice(RESTAURANTS), dish=rng.choice(DISHES), subject=rng.choice(SUBJECTS),
            symbol=rng.choice(SYMBOLS), exchange=rng.choice(["nyse", "nasdaq"]), genre=rng.choice(GENRES),
            word=rng.choice(WORDS), language=rng.choice(LANGUAGES), place=rng.choice(PLACES),
            room=rng.choice(ROOMS), temp=rng.choice(TEMPERATURES), task=rng.choice(TASKS),
            percent=rng.choice([10, 15, 20]), amount=rng.choice(AMOUNTS), n=rng.randint(2, 8),
            hour=rng.randint(0, 23))
        out.append(sent[0].upper() + sent[1:])
    return out
