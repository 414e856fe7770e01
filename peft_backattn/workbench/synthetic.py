"""Seeded GSM8K-like word problems, generated in-process so that training and tests need no network.

Each template draws a name, items and numbers from a `random.Random`, computes the answer from what it drew, and writes
a worked solution that shows every step as `a op b = c` (so a test can recompute it), ending in GSM8K's `#### N` line.
A problem belongs to a split by a hash of its text, so no problem text is ever in two splits, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from ..validation import positive_int
from .problems import MathExample

SPLITS = ("train", "validation", "test")

# Mixed into the seed so that these draws differ from other users of the same small integer seed.
_SEED_SALT = "peft-backattn-synthetic"
# sha256(problem) mod 10 -> split: 80% train, 10% validation, 10% test.
_SPLIT_OF_BUCKET = ("train",) * 8 + ("validation", "test")

# (name, subject pronoun, possessive pronoun)
_PEOPLE = (
    ("Tom", "he", "his"),
    ("Maria", "she", "her"),
    ("Aisha", "she", "her"),
    ("Kenji", "he", "his"),
    ("Olivia", "she", "her"),
    ("Diego", "he", "his"),
    ("Priya", "she", "her"),
    ("Liam", "he", "his"),
    ("Fatima", "she", "her"),
    ("Noah", "he", "his"),
    ("Mei", "she", "her"),
    ("Samuel", "he", "his"),
    ("Chloe", "she", "her"),
    ("Omar", "he", "his"),
    ("Ingrid", "she", "her"),
    ("Mateo", "he", "his"),
    ("Zara", "she", "her"),
    ("Ethan", "he", "his"),
    ("Nadia", "she", "her"),
    ("Kwame", "he", "his"),
    ("Lucia", "she", "her"),
    ("Arjun", "he", "his"),
    ("Hannah", "she", "her"),
    ("Felix", "he", "his"),
)
_SHOP_ITEMS = ("pens", "notebooks", "apples", "comic books", "candles", "mugs", "socks", "rulers", "plants", "puzzles")
_DISCOUNT_ITEMS = (
    ("jacket", "jackets"),
    ("lamp", "lamps"),
    ("backpack", "backpacks"),
    ("pair of shoes", "pairs of shoes"),
    ("board game", "board games"),
    ("helmet", "helmets"),
)
_FACTORIES = (
    ("bakery", "loaves"),
    ("toy factory", "toy cars"),
    ("print shop", "posters"),
    ("bottling plant", "bottles"),
)
_SHARED_ITEMS = ("cookies", "crayons", "stickers", "grapes", "muffins", "pencils")
_COLLECTIONS = ("marbles", "stickers", "baseball cards", "seashells", "stamps", "coins")
_ACTIVITIES = ("the piano", "the violin", "chess", "swimming", "karate", "drawing")
_PURCHASES = ("bike", "video game", "telescope", "skateboard", "guitar", "tent")
_VEHICLES = (("train", 50, 120), ("bus", 30, 80), ("car", 40, 100), ("cyclist", 10, 25), ("ferry", 15, 40))
_CROPS = (("tomato", "tomatoes"), ("pepper", "peppers"), ("strawberry", "strawberries"), ("lemon", "lemons"))


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_PEOPLE)


def _shopping_with_change(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, _ = _person(rng)
    item1, item2 = rng.sample(_SHOP_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    cost1, cost2 = n1 * p1, n2 * p2
    total = cost1 + cost2
    bill = next(b for b in (20, 50, 100, 200, 500) if b > total)  # the smallest bill that covers the total
    change = bill - total
    problem = (
        f"{name} buys {n1} {item1} at ${p1} each and {n2} {item2} at ${p2} each. {he.capitalize()} pays with a "
        f"${bill} bill. How much change, in dollars, does {he} get back?"
    )
    steps = [
        f"{name} buys {n1} {item1} at ${p1} each, so {he} pays {n1} * {p1} = {cost1} dollars for them.",
        f"The {item2} cost {n2} * {p2} = {cost2} dollars.",
        f"Altogether {he} spends {cost1} + {cost2} = {total} dollars.",
        f"{he.capitalize()} gets back {bill} - {total} = {change} dollars.",
    ]
    return problem, steps, change


def _rate_times_time(rng: random.Random) -> tuple[str, list[str], int]:
    place, things = rng.choice(_FACTORIES)
    rate, hours, days = rng.randint(5, 60), rng.randint(2, 12), rng.randint(2, 7)
    per_day = rate * hours
    made = per_day * days
    rejected = rng.randint(1, made // 5)
    good = made - rejected
    problem = (
        f"A machine at a {place} makes {rate} {things} every hour. It runs {hours} hours a day for {days} days, and "
        f"{rejected} of the {things} it makes fail inspection. How many good {things} does it make?"
    )
    steps = [
        f"Each day the machine makes {rate} * {hours} = {per_day} {things}.",
        f"In {days} days it makes {per_day} * {days} = {made} {things}.",
        f"{rejected} fail inspection, so {made} - {rejected} = {good} are good.",
    ]
    return problem, steps, good


def _sharing_equally(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, _ = _person(rng)
    item = rng.choice(_SHARED_ITEMS)
    # Draw the answer first, then a total that leaves exactly friends * each after what is kept.
    friends, each, boxes = rng.randint(2, 8), rng.randint(3, 15), rng.randint(2, 6)
    shared = friends * each
    per_box = shared // boxes + rng.randint(1, 5)
    total = boxes * per_box
    kept = total - shared
    problem = (
        f"{name} has {boxes} boxes of {item} with {per_box} in each box. {he.capitalize()} keeps {kept} and shares "
        f"the rest equally among {friends} friends. How many {item} does each friend get?"
    )
    steps = [
        f"{name} has {boxes} * {per_box} = {total} {item}.",
        f"After keeping {kept}, {total} - {kept} = {shared} are left to share.",
        f"Each friend gets {shared} / {friends} = {each} {item}.",
    ]
    return problem, steps, each


def _percent_off(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, _ = _person(rng)
    item, items = rng.choice(_DISCOUNT_ITEMS)
    # A price in multiples of $20 and a percentage in multiples of 5 make every discount a whole number of dollars.
    price, percent, count = 20 * rng.randint(1, 15), rng.choice((5, 10, 15, 20, 25, 30, 40, 50)), rng.randint(2, 6)
    off = price * percent // 100
    each = price - off
    paid = count * each
    problem = (
        f"A {item} costs ${price}. This week the store takes {percent}% off the price. {name} buys {count} {items}. "
        f"How many dollars does {he} pay?"
    )
    steps = [
        f"The discount on one {item} is {price} * {percent} / 100 = {off} dollars.",
        f"So one {item} costs {price} - {off} = {each} dollars.",
        f"{name} pays {count} * {each} = {paid} dollars for {count} {items}.",
    ]
    return problem, steps, paid


def _ages(rng: random.Random) -> tuple[str, list[str], int]:
    (older, _, _), (younger, _, _) = rng.sample(_PEOPLE, 2)
    times, young_age, years = rng.randint(2, 4), rng.randint(2, 15), rng.randint(2, 12)
    old_age = times * young_age
    old_later, young_later = old_age + years, young_age + years
    together = old_later + young_later
    problem = (
        f"{older} is {times} times as old as {younger}. {younger} is {young_age} years old. In {years} years, what "
        f"will the sum of their ages be?"
    )
    steps = [
        f"{older} is {times} * {young_age} = {old_age} years old.",
        f"In {years} years {older} will be {old_age} + {years} = {old_later} years old.",
        f"{younger} will be {young_age} + {years} = {young_later} years old.",
        f"The sum of their ages will be {old_later} + {young_later} = {together}.",
    ]
    return problem, steps, together


def _minutes_to_hours(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, _ = _person(rng)
    activity = rng.choice(_ACTIVITIES)
    while True:  # redraw until the total is a whole number of hours (most draws are)
        minutes, days, weeks = rng.choice((15, 20, 30, 40, 45, 60, 75, 90)), rng.randint(2, 7), rng.randint(2, 8)
        if minutes * days * weeks % 60 == 0:
            break
    weekly = minutes * days
    total = weekly * weeks
    hours = total // 60
    problem = (
        f"{name} practices {activity} for {minutes} minutes a day, {days} days a week. How many hours does {he} "
        f"practice in {weeks} weeks?"
    )
    steps = [
        f"Each week {he} practices {minutes} * {days} = {weekly} minutes.",
        f"In {weeks} weeks that is {weekly} * {weeks} = {total} minutes.",
        f"An hour has 60 minutes, so that is {total} / 60 = {hours} hours.",
    ]
    return problem, steps, hours


def _meters_to_kilometers(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, _ = _person(rng)
    while True:  # redraw until the distance is a whole number of kilometers
        track, laps, days = rng.choice((200, 250, 400, 500)), rng.randint(2, 12), rng.randint(2, 10)
        if track * laps * days % 1000 == 0:
            break
    daily = laps * track
    total = daily * days
    kilometers = total // 1000
    problem = (
        f"A running track is {track} meters around. {name} runs {laps} laps every day for {days} days. How many "
        f"kilometers does {he} run in total?"
    )
    steps = [
        f"Each day {he} runs {laps} * {track} = {daily} meters.",
        f"In {days} days {he} runs {daily} * {days} = {total} meters.",
        f"A kilometer is 1000 meters, so {he} runs {total} / 1000 = {kilometers} kilometers.",
    ]
    return problem, steps, kilometers


def _weekly_savings(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, his = _person(rng)
    purchase = rng.choice(_PURCHASES)
    earned, spent, weeks = rng.randint(10, 40), rng.randint(1, 9), rng.randint(4, 20)
    kept = earned - spent
    saved = kept * weeks
    price = rng.randint(saved // 3, saved - 1)
    left = saved - price
    problem = (
        f"{name} earns ${earned} a week doing chores and spends ${spent} of it each week. After {weeks} weeks {he} "
        f"buys a {purchase} for ${price} with {his} savings. How many dollars does {he} have left?"
    )
    steps = [
        f"Each week {he} keeps {earned} - {spent} = {kept} dollars.",
        f"After {weeks} weeks {he} has saved {kept} * {weeks} = {saved} dollars.",
        f"After buying the {purchase} {he} has {saved} - {price} = {left} dollars left.",
    ]
    return problem, steps, left


def _two_leg_trip(rng: random.Random) -> tuple[str, list[str], int]:
    vehicle, slowest, fastest = rng.choice(_VEHICLES)
    speed1, hours1 = rng.randint(slowest, fastest), rng.randint(2, 6)
    speed2, hours2 = rng.randint(slowest, fastest), rng.randint(2, 5)
    leg1, leg2 = speed1 * hours1, speed2 * hours2
    distance = leg1 + leg2
    problem = (
        f"A {vehicle} travels at {speed1} kilometers per hour for {hours1} hours, then at {speed2} kilometers per "
        f"hour for {hours2} hours. How many kilometers does it travel in all?"
    )
    steps = [
        f"In the first part it travels {speed1} * {hours1} = {leg1} kilometers.",
        f"In the second part it travels {speed2} * {hours2} = {leg2} kilometers.",
        f"In all it travels {leg1} + {leg2} = {distance} kilometers.",
    ]
    return problem, steps, distance


def _harvest_in_bags(rng: random.Random) -> tuple[str, list[str], int]:
    name, he, _ = _person(rng)
    crop, crops = rng.choice(_CROPS)
    while True:  # redraw until the harvest fills a whole number of bags
        rows, per_row, per_plant, bag = rng.randint(2, 9), rng.randint(3, 12), rng.randint(2, 10), rng.randint(4, 12)
        if rows * per_row * per_plant % bag == 0:
            break
    plants = rows * per_row
    harvest = plants * per_plant
    bags = harvest // bag
    problem = (
        f"{name} grows {rows} rows of {crop} plants with {per_row} plants in each row. Each plant gives {per_plant} "
        f"{crops}. {he.capitalize()} packs all the {crops} into bags of {bag}. How many bags does {he} fill?"
    )
    steps = [
        f"{name} has {rows} * {per_row} = {plants} plants.",
        f"They give {plants} * {per_plant} = {harvest} {crops}.",
        f"That fills {harvest} / {bag} = {bags} bags.",
    ]
    return problem, steps, bags


def _fraction_given_away(rng: random.Random) -> tuple[str, list[str], int]:
    (name, he, _), (friend, _, _) = rng.sample(_PEOPLE, 2)
    things = rng.choice(_COLLECTIONS)
    part = rng.randint(2, 5)
    owned = part * rng.randint(3, 20)
    given = owned // part
    rest = owned - given
    lost = rng.randint(1, rest - 1)
    left = rest - lost
    problem = (
        f"{name} has {owned} {things}. {he.capitalize()} gives 1/{part} of them to {friend} and then loses {lost}. "
        f"How many {things} does {name} have now?"
    )
    steps = [
        f"{name} gives away {owned} / {part} = {given} {things}.",
        f"That leaves {owned} - {given} = {rest} {things}.",
        f"After losing {lost}, {he} has {rest} - {lost} = {left} {things}.",
    ]
    return problem, steps, left


_TEMPLATES: tuple[Callable[[random.Random], tuple[str, list[str], int]], ...] = (
    _shopping_with_change,
    _rate_times_time,
    _sharing_equally,
    _percent_off,
    _ages,
    _minutes_to_hours,
    _meters_to_kilometers,
    _weekly_savings,
    _two_leg_trip,
    _harvest_in_bags,
    _fraction_given_away,
)


def _split_of(problem: str) -> str:
    """The split a problem text belongs to: a stable hash, so the same text lands in the same split in every run."""
    bucket = int.from_bytes(hashlib.sha256(problem.encode("utf-8")).digest()[:8], "big") % len(_SPLIT_OF_BUCKET)
    return _SPLIT_OF_BUCKET[bucket]


def generate_examples(count: int, *, split: str = "train", seed: int = 0) -> list[MathExample]:
    """`count` distinct word problems of `split`, with worked solutions ending in '#### N'.

    The same (split, seed) always gives the same list. Problems are drawn from one seeded stream and kept when their
    text hashes to `split`, so every split of every seed is disjoint from the other splits.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    positive_int(count, "count")
    rng = random.Random(f"{_SEED_SALT}:{seed}")  # a str seed is hashed with sha512, not Python's randomised hash
    examples: list[MathExample] = []
    seen: set[str] = set()
    while len(examples) < count:
        problem, steps, answer = rng.choice(_TEMPLATES)(rng)
        if _split_of(problem) != split or problem in seen:
            continue
        seen.add(problem)
        solution = "\n".join([*steps, f"#### {answer}"])
        examples.append(MathExample(problem=problem, solution=solution, answer=str(answer)))
    return examples
