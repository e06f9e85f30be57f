#!/usr/bin/env python3
"""The guide's example of one's own data: a few hundred arithmetic and
number-sense questions with four choices, made here (seeded), as CSV files
with the choices in columns A-D, for the walk-through of training on one's own
questions (docs/guide.md section 6).

Four kinds, of graded difficulty, so that a small model is sure of some and
unsure of others: sums of two numbers (two or three digits), products of a
one-digit and a two-digit number, the next term of an arithmetic sequence,
and the largest of four numbers. Wrong choices are near misses (off by 1, 10
or a digit swap), so guessing by form does not help.

    python3 experiments/own-data/make.py   # writes train.csv, validation.csv, test.csv here
"""
import csv
import random
from pathlib import Path

HERE = Path(__file__).parent
SIZES = {"train": 400, "validation": 100, "test": 200}


def near_misses(rng, right, k=3):
    out = set()
    while len(out) < k:
        miss = right + rng.choice([-10, -2, -1, 1, 2, 10, 9, -9])
        if miss != right and miss >= 0:
            out.add(miss)
    return list(out)


def question(rng):
    kind = rng.randrange(4)
    if kind == 0:
        digits = rng.choice([2, 3])
        a, b = (rng.randrange(10 ** (digits - 1), 10 ** digits) for _ in range(2))
        text, right = f"What is {a} + {b}?", a + b
    elif kind == 1:
        a, b = rng.randrange(2, 10), rng.randrange(11, 100)
        text, right = f"What is {a} x {b}?", a * b
    elif kind == 2:
        start, step = rng.randrange(1, 50), rng.randrange(2, 13)
        terms = [start + i * step for i in range(4)]
        text, right = f"What comes next: {', '.join(map(str, terms))}, ...?", start + 4 * step
    else:
        numbers = rng.sample(range(100, 1000), 4)
        right = max(numbers)
        choices = [str(n) for n in numbers]
        return "Which is the largest?", choices, choices.index(str(right))
    choices = [right] + near_misses(rng, right)
    rng.shuffle(choices)
    return text, [str(c) for c in choices], choices.index(right)


def main():
    rng = random.Random(20261206)
    n = 0
    for split, size in SIZES.items():
        with open(HERE / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            for _ in range(size):
                text, choices, answer = question(rng)
                w.writerow([f"q{n}", text, *choices, "ABCD"[answer]])
                n += 1
    print({split: size for split, size in SIZES.items()})


if __name__ == "__main__":
    main()
