"""Deterministic corpus builder for the embedded demo pair.

Topics (each clearly different from the others, mirroring the paper's online streams):

- ``code``:  functions with docstrings from the running interpreter's standard library
  (signature + docstring -> body, like CodeSearchNet).
- ``math``:  generated grade-school word problems with step-by-step worked answers (like GSM8K).
- ``sql``:   generated natural-language questions -> SQL over a few toy schemas (like Spider).
- ``prose``: finance/legal-style text (generated reports and contract clauses) plus paragraphs of
  the licence texts Debian ships in /usr/share/common-licenses (when present).
- ``general``: a mixed warm-up set of generic English (generated short stories, everyday
  descriptions and letters, Python's own English documentation topics, and optional Debian
  packages: fortunes, python3.11-doc) used to warm up the draft only.

Every record is ``{"id", "topic", "prompt", "completion"}``; the document text is
``prompt + completion``. Held-out splits are decided per document (per function, per problem,
per licence paragraph group), never per line, by a seeded hash, and are kept in separate files.
Everything is deterministic given ``seed`` and the machine's stdlib/licence files.
"""

from __future__ import annotations

import ast
import hashlib
import html
import json
import os
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

TOPICS = ("code", "math", "sql", "prose")
ALL_SETS = TOPICS + ("general",)


@dataclass
class CorpusConfig:
    seed: int = 0
    heldout_frac: float = 0.05
    max_code_functions: int | None = None  # None: all suitable stdlib functions
    n_math: int = 24000
    n_sql: int = 24000
    n_prose: int = 14000
    n_general: int = 16000
    max_pydoc_paragraphs: int | None = 3000
    code_extra: bool = True  # train-only: stdlib functions without docstrings + the test suite
    max_code_extra: int | None = 15000
    max_code_files: int | None = None  # scan only a seeded sample of stdlib files (tiny configs)
    min_heldout: int = 60  # at least this many held-out docs per topic (streams need ~40)


def _hash_frac(seed: int, key: str) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _split_of(seed: int, key: str, frac: float) -> str:
    return "heldout" if _hash_frac(seed, key) < frac else "train"


# ----------------------------------------------------------------------------------------- code
_SKIP_DIRS = {
    "test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__",
    "ensurepip", "idlelib", "dist-packages", "config-3.11-x86_64-linux-gnu",
}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_EXTRA_OK_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo"}


def iter_code_functions(root: Path | None = None, extra: bool = False,
                        max_files: int | None = None, seed: int = 0) -> Iterator[dict]:
    """Yield functions with docstrings from the stdlib: prompt = signature + docstring.

    ``extra=True`` instead yields the functions *without* docstrings (and those in the test
    suite, idlelib, ...): training-only code data, prompt = the ``def`` line.
    """
    root = root or stdlib_dir()
    skip = _SKIP_DIRS - _EXTRA_OK_DIRS if extra else _SKIP_DIRS
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("config-"))
        for fn in sorted(filenames):
            if fn.endswith(".py") and (extra or not fn.startswith("test_")):
                files.append(Path(dirpath) / fn)
    if max_files is not None and len(files) > max_files:  # small configs: a seeded file sample
        files = sorted(random.Random(f"{seed}:codefiles:{extra}").sample(files, max_files))
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        lines = src.splitlines()
        rel = path.relative_to(root).as_posix()
        in_extra_dir = any(part in _EXTRA_OK_DIRS for part in Path(rel).parts[:-1]) or rel.split("/")[-1].startswith("test_")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if not node.body or node.end_lineno is None:
                continue
            has_doc = (isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                       and isinstance(node.body[0].value.value, str))
            if extra:
                if has_doc and not in_extra_dir:
                    continue  # those belong to the docstring set (and may be held out)
                text = textwrap.dedent("\n".join(lines[node.lineno - 1: node.end_lineno]))
                if not text.startswith(("def ", "async def ")) or not (100 <= len(text) <= 3000) or "\t" in text:
                    continue
                head, _, body = text.partition("\n")
                if len(body.strip()) < 20:
                    continue
                yield {"id": f"code:extra:{rel}:{node.lineno}:{node.name}", "prompt": head,
                       "completion": "\n" + body.rstrip() + "\n"}
                continue
            if not isinstance(node.body[0], ast.Expr):
                continue
            doc = node.body[0].value
            if not (isinstance(doc, ast.Constant) and isinstance(doc.value, str)):
                continue
            if len(node.body) < 2 or node.end_lineno is None or node.body[0].end_lineno is None:
                continue
            seg = lines[node.lineno - 1: node.end_lineno]
            text = textwrap.dedent("\n".join(seg))
            if not text.startswith(("def ", "async def ")):
                continue
            if not (150 <= len(text) <= 2200) or "\t" in text:
                continue
            n_head = node.body[0].end_lineno - node.lineno + 1
            tlines = text.split("\n")
            # the newline after the docstring goes to the completion: byte-level BPE merges
            # "\n" with the next line's indentation, so a prompt ending in "\n" would end on a
            # token the model never sees before a body (it would predict <eos>)
            prompt = "\n".join(tlines[:n_head])
            completion = "\n" + "\n".join(tlines[n_head:]).rstrip() + "\n"
            if len(completion.strip()) < 20:
                continue
            yield {"id": f"code:{rel}:{node.lineno}:{node.name}", "prompt": prompt,
                   "completion": completion}


# ----------------------------------------------------------------------------------------- math
NAMES = ["Alice", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
         "Keiko", "Liam", "Maya", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Sam", "Tara",
         "Umar", "Vera", "Wei", "Xavier", "Yara", "Zoe", "Marco", "Nina", "Omar", "Priya"]
ITEMS = [("apple", "apples"), ("pencil", "pencils"), ("cookie", "cookies"), ("marble", "marbles"),
         ("book", "books"), ("sticker", "stickers"), ("orange", "oranges"), ("cupcake", "cupcakes"),
         ("toy car", "toy cars"), ("balloon", "balloons"), ("shell", "shells"), ("card", "cards")]
SHOPS = ["bakery", "bookstore", "farm stand", "toy shop", "market", "school fair", "garden center"]


def _math_problem(rng: random.Random) -> tuple[str, list[str], int]:
    kind = rng.randrange(14)
    n = rng.choice(NAMES)
    m = rng.choice([x for x in NAMES if x != n])
    item, items = rng.choice(ITEMS)
    if kind == 0:
        a, b, c = rng.randint(5, 60), rng.randint(2, 30), rng.randint(1, 20)
        c = min(c, a + b)
        q = (f"{n} has {a} {items}. {m} gives {n} {b} more {items}. Then {n} gives away {c} "
             f"{items}. How many {items} does {n} have now?")
        s = [f"{n} starts with {a} {items}.", f"After getting {b} more, {n} has {a} + {b} = {a + b} {items}.",
             f"After giving away {c}, {n} has {a + b} - {c} = {a + b - c} {items}."]
        return q, s, a + b - c
    if kind == 1:
        p, k = rng.randint(2, 15), rng.randint(2, 12)
        q = f"Each {item} costs ${p}. {n} buys {k} {items} at the {rng.choice(SHOPS)}. How much does {n} spend?"
        s = [f"Each {item} costs ${p}.", f"{n} buys {k} {items}, so the cost is {k} * {p} = {k * p} dollars."]
        return q, s, k * p
    if kind == 2:
        per, boxes, extra = rng.randint(3, 12), rng.randint(2, 9), rng.randint(1, 15)
        q = (f"{n} packs {items} into boxes. Each box holds {per} {items}. {n} fills {boxes} boxes "
             f"and has {extra} {items} left over. How many {items} did {n} have?")
        s = [f"The full boxes hold {boxes} * {per} = {boxes * per} {items}.",
             f"Adding the {extra} left over gives {boxes * per} + {extra} = {boxes * per + extra} {items}."]
        return q, s, boxes * per + extra
    if kind == 3:
        k, total = rng.randint(2, 9), 0
        per = rng.randint(2, 20)
        total = k * per
        q = f"{n} shares {total} {items} equally among {k} friends. How many {items} does each friend get?"
        s = [f"{n} has {total} {items} and {k} friends.", f"Each friend gets {total} / {k} = {per} {items}."]
        return q, s, per
    if kind == 4:
        speed, hours = rng.randint(20, 80), rng.randint(2, 8)
        q = f"A train travels at {speed} miles per hour for {hours} hours. How many miles does it travel?"
        s = [f"Distance is speed times time.", f"The train travels {speed} * {hours} = {speed * hours} miles."]
        return q, s, speed * hours
    if kind == 5:
        wage, hours, days = rng.randint(8, 30), rng.randint(3, 9), rng.randint(2, 6)
        q = (f"{n} earns ${wage} per hour and works {hours} hours a day for {days} days. "
             f"How much money does {n} earn in total?")
        s = [f"Each day {n} earns {wage} * {hours} = {wage * hours} dollars.",
             f"Over {days} days {n} earns {wage * hours} * {days} = {wage * hours * days} dollars."]
        return q, s, wage * hours * days
    if kind == 6:
        price, pct = rng.choice([20, 40, 50, 60, 80, 100, 120, 150, 200, 250]), rng.choice([10, 20, 25, 50])
        off = price * pct // 100
        q = f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price?"
        s = [f"The discount is {pct}% of {price}, which is {price} * {pct} / 100 = {off} dollars.",
             f"The sale price is {price} - {off} = {price - off} dollars."]
        return q, s, price - off
    if kind == 7:
        a = rng.randint(3, 40)
        mult = rng.randint(2, 5)
        q = (f"{n} has {a} {items}. {m} has {mult} times as many {items} as {n}. "
             f"How many {items} do they have together?")
        s = [f"{m} has {mult} * {a} = {mult * a} {items}.",
             f"Together they have {a} + {mult * a} = {a + mult * a} {items}."]
        return q, s, a + mult * a
    if kind == 8:
        l, w = rng.randint(3, 30), rng.randint(2, 20)
        q = f"A rectangular garden is {l} meters long and {w} meters wide. What is its perimeter in meters?"
        s = [f"The perimeter is 2 * (length + width).", f"That is 2 * ({l} + {w}) = 2 * {l + w} = {2 * (l + w)} meters."]
        return q, s, 2 * (l + w)
    if kind == 9:
        l, w = rng.randint(3, 30), rng.randint(2, 20)
        q = f"A room is {l} feet long and {w} feet wide. How many square feet of carpet are needed to cover the floor?"
        s = [f"The area is length times width.", f"The area is {l} * {w} = {l * w} square feet."]
        return q, s, l * w
    if kind == 10:
        pages, per_day, done = rng.randint(100, 400), rng.randint(10, 40), rng.randint(2, 6)
        read = per_day * done
        if read >= pages:
            pages = read + rng.randint(10, 90)
        q = (f"{n} is reading a book with {pages} pages. {n} reads {per_day} pages a day for {done} days. "
             f"How many pages are left?")
        s = [f"{n} reads {per_day} * {done} = {read} pages.", f"Pages left: {pages} - {read} = {pages - read}."]
        return q, s, pages - read
    if kind == 11:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        q = (f"{n} scored {a}, {b} and {c} points in three games. How many points did {n} score in all, "
             f"and how many more points were scored in the best game than in the worst game?")
        hi, lo = max(a, b, c), min(a, b, c)
        s = [f"In all, {n} scored {a} + {b} + {c} = {a + b + c} points.",
             f"The best game was {hi} and the worst was {lo}, a difference of {hi} - {lo} = {hi - lo}.",
             f"The question asks for the difference."]
        return q, s, hi - lo
    if kind == 12:
        cnt, legs = rng.randint(2, 15), rng.randint(2, 12)
        q = (f"A farm has {cnt} chickens and {legs} cows. How many legs do the animals have in total?")
        s = [f"The chickens have {cnt} * 2 = {cnt * 2} legs.", f"The cows have {legs} * 4 = {legs * 4} legs.",
             f"In total there are {cnt * 2} + {legs * 4} = {cnt * 2 + legs * 4} legs."]
        return q, s, cnt * 2 + legs * 4
    saved, weeks, cost = rng.randint(5, 25), rng.randint(3, 12), rng.randint(40, 300)
    have = saved * weeks
    q = (f"{n} wants a bike that costs ${cost}. {n} saves ${saved} each week for {weeks} weeks. "
         f"How much more money does {n} need?")
    need = max(cost - have, 0)
    s = [f"{n} saves {saved} * {weeks} = {have} dollars."]
    s.append(f"{n} needs {cost} - {have} = {need} more dollars." if have < cost
             else f"{have} is at least {cost}, so {n} needs 0 more dollars.")
    return q, s, need


def gen_math(n: int, rng: random.Random) -> Iterator[dict]:
    for i in range(n):
        q, steps, ans = _math_problem(rng)
        yield {"id": f"math:{i}", "prompt": f"Question: {q}\nAnswer:",
               "completion": " " + "\n".join(steps) + f"\n#### {ans}\n"}


# ------------------------------------------------------------------------------------------ sql
SCHEMAS = {
    "company": {
        "tables": {"employees": ["id", "name", "dept_id", "salary", "hire_year", "city"],
                   "departments": ["id", "name", "budget"]},
        "entity": "employees", "name_col": "name", "num_col": "salary", "cat_col": "city",
        "year_col": "hire_year", "child": "employees", "parent": "departments", "fk": "dept_id",
        "parent_name": "department", "num_word": "salary", "entity_word": "employees",
        "cats": ["Boston", "Denver", "Austin", "Seattle", "Chicago", "Miami"],
        "parent_vals": ["Sales", "Engineering", "Marketing", "Finance", "Support"],
    },
    "school": {
        "tables": {"students": ["id", "name", "class_id", "gpa", "birth_year", "country"],
                   "classes": ["id", "name", "teacher"]},
        "entity": "students", "name_col": "name", "num_col": "gpa", "cat_col": "country",
        "year_col": "birth_year", "child": "students", "parent": "classes", "fk": "class_id",
        "parent_name": "class", "num_word": "GPA", "entity_word": "students",
        "cats": ["France", "Japan", "Brazil", "Canada", "Kenya", "India"],
        "parent_vals": ["Biology", "History", "Algebra", "Chemistry", "Art"],
    },
    "shop": {
        "tables": {"orders": ["id", "customer_id", "amount", "order_year", "status"],
                   "customers": ["id", "name", "segment"]},
        "entity": "orders", "name_col": "id", "num_col": "amount", "cat_col": "status",
        "year_col": "order_year", "child": "orders", "parent": "customers", "fk": "customer_id",
        "parent_name": "customer", "num_word": "amount", "entity_word": "orders",
        "cats": ["shipped", "pending", "cancelled", "returned"],
        "parent_vals": ["Acme Corp", "Globex", "Initech", "Umbrella", "Stark Ltd"],
    },
    "music": {
        "tables": {"songs": ["id", "title", "artist_id", "duration", "release_year", "genre"],
                   "artists": ["id", "name", "country"]},
        "entity": "songs", "name_col": "title", "num_col": "duration", "cat_col": "genre",
        "year_col": "release_year", "child": "songs", "parent": "artists", "fk": "artist_id",
        "parent_name": "artist", "num_word": "duration", "entity_word": "songs",
        "cats": ["rock", "jazz", "pop", "folk", "blues", "hip hop"],
        "parent_vals": ["The Beatles", "Miles Davis", "Adele", "Nirvana", "Bob Dylan"],
    },
    "flights": {
        "tables": {"flights": ["id", "flight_no", "airport_id", "distance", "year", "airline"],
                   "airports": ["id", "name", "city"]},
        "entity": "flights", "name_col": "flight_no", "num_col": "distance", "cat_col": "airline",
        "year_col": "year", "child": "flights", "parent": "airports", "fk": "airport_id",
        "parent_name": "airport", "num_word": "distance", "entity_word": "flights",
        "cats": ["Delta", "United", "Lufthansa", "Qantas", "Emirates"],
        "parent_vals": ["Heathrow", "Changi", "O'Hare", "Narita", "Schiphol"],
    },
}


def _sql_problem(rng: random.Random) -> tuple[str, str, str]:
    sname = rng.choice(sorted(SCHEMAS))
    S = SCHEMAS[sname]
    schema = "; ".join(f"{t}({', '.join(cols)})" for t, cols in S["tables"].items())
    ent, ew, nc, nw = S["entity"], S["entity_word"], S["num_col"], S["num_word"]
    cc, yc, name = S["cat_col"], S["year_col"], S["name_col"]
    par, fk, pn = S["parent"], S["fk"], S["parent_name"]
    cat = rng.choice(S["cats"])
    pv = rng.choice(S["parent_vals"]).replace("'", "''")
    pv_show = pv.replace("''", "'")
    year = rng.randint(1990, 2023)
    k = rng.randint(2, 10)
    thr = rng.choice([10, 50, 100, 500, 1000, 3, 4]) if nc != "gpa" else rng.choice([2.5, 3.0, 3.5])
    kind = rng.randrange(12)
    if kind == 0:
        q, s = f"How many {ew} are there?", f"SELECT COUNT(*) FROM {ent};"
    elif kind == 1:
        q, s = f"List the {name} of all {ew} with {cc} '{cat}'.", f"SELECT {name} FROM {ent} WHERE {cc} = '{cat}';"
    elif kind == 2:
        q, s = f"What is the average {nw} of {ew} for each {cc}?", f"SELECT {cc}, AVG({nc}) FROM {ent} GROUP BY {cc};"
    elif kind == 3:
        q, s = (f"Show the {k} {ew} with the highest {nw}.",
                f"SELECT {name}, {nc} FROM {ent} ORDER BY {nc} DESC LIMIT {k};")
    elif kind == 4:
        q, s = (f"How many {ew} belong to the {pn} named '{pv_show}'?",
                f"SELECT COUNT(*) FROM {ent} AS t1 JOIN {par} AS t2 ON t1.{fk} = t2.id WHERE t2.name = '{pv}';")
    elif kind == 5:
        q, s = (f"Find the {name} of {ew} whose {nw} is greater than {thr}.",
                f"SELECT {name} FROM {ent} WHERE {nc} > {thr};")
    elif kind == 6:
        q, s = (f"Which {pn} has the most {ew}?",
                f"SELECT t2.name FROM {ent} AS t1 JOIN {par} AS t2 ON t1.{fk} = t2.id "
                f"GROUP BY t2.name ORDER BY COUNT(*) DESC LIMIT 1;")
    elif kind == 7:
        q, s = (f"Count the {ew} from {yc.replace('_', ' ')} {year} onwards.",
                f"SELECT COUNT(*) FROM {ent} WHERE {yc} >= {year};")
    elif kind == 8:
        q, s = (f"What are the minimum and maximum {nw} of {ew} with {cc} '{cat}'?",
                f"SELECT MIN({nc}), MAX({nc}) FROM {ent} WHERE {cc} = '{cat}';")
    elif kind == 9:
        q, s = (f"List each {pn} name with the total {nw} of its {ew}.",
                f"SELECT t2.name, SUM(t1.{nc}) FROM {ent} AS t1 JOIN {par} AS t2 ON t1.{fk} = t2.id GROUP BY t2.name;")
    elif kind == 10:
        q, s = (f"Which values of {cc} have more than {k} {ew}?",
                f"SELECT {cc} FROM {ent} GROUP BY {cc} HAVING COUNT(*) > {k};")
    else:
        y2 = year + rng.randint(1, 10)
        q, s = (f"List the {name} and {nw} of {ew} between {yc.replace('_', ' ')} {year} and {y2}, sorted by {nw}.",
                f"SELECT {name}, {nc} FROM {ent} WHERE {yc} BETWEEN {year} AND {y2} ORDER BY {nc};")
    return schema, q, s


def gen_sql(n: int, rng: random.Random) -> Iterator[dict]:
    for i in range(n):
        schema, q, s = _sql_problem(rng)
        yield {"id": f"sql:{i}", "prompt": f"-- Tables: {schema}\n-- Question: {q}\n",
               "completion": s + "\n"}


# ---------------------------------------------------------------------------------------- prose
COMPANIES = ["Northwind Holdings", "Bluewater Capital", "Ardent Systems", "Meridian Foods",
             "Halcyon Energy", "Crestline Bancorp", "Vantage Logistics", "Silverpeak Media",
             "Granite Insurance Group", "Orion Pharmaceuticals", "Keystone Retail", "Atlas Mining"]
PARTIES = [("the Licensor", "the Licensee"), ("the Company", "the Consultant"),
           ("the Landlord", "the Tenant"), ("the Seller", "the Buyer"),
           ("the Lender", "the Borrower"), ("the Employer", "the Employee")]


def _finance_doc(rng: random.Random) -> tuple[str, str]:
    co = rng.choice(COMPANIES)
    q = rng.randint(1, 4)
    yr = rng.randint(2015, 2025)
    rev = rng.randint(120, 9800) / 10
    g = rng.randint(-150, 250) / 10
    margin = rng.randint(50, 350) / 10
    eps = rng.randint(5, 480) / 100
    div = rng.randint(1, 90) / 100
    seg = rng.choice(["cloud services", "consumer products", "commercial lending", "specialty chemicals",
                      "freight operations", "wealth management", "renewable generation"])
    dirn = "increased" if g >= 0 else "decreased"
    prompt = f"{co} reported results for the {['first', 'second', 'third', 'fourth'][q - 1]} quarter of fiscal {yr}."
    s = [f" Revenue {dirn} {abs(g)}% year over year to ${rev} million, driven primarily by {seg}.",
         f" Operating margin was {margin}%, compared with {max(margin - rng.randint(-30, 30) / 10, 1.0):.1f}% in the prior-year period.",
         f" Diluted earnings per share were ${eps:.2f}.",
         rng.choice([f" The Board of Directors declared a quarterly dividend of ${div:.2f} per share, payable to shareholders of record.",
                     f" Management reaffirmed its full-year guidance and expects capital expenditures to remain within the previously announced range.",
                     f" The company repurchased shares during the quarter and ended the period with a net cash position.",
                     f" Management noted that foreign exchange movements reduced reported revenue by approximately {rng.randint(1, 40) / 10}%."]),
         rng.choice([" Forward-looking statements in this release are subject to risks and uncertainties that could cause actual results to differ materially.",
                     " Liquidity remained strong, and the company continues to evaluate opportunities to return capital to shareholders.",
                     " Investors should review the risk factors described in the company's most recent annual report."])]
    return prompt, "".join(s)


def _legal_doc(rng: random.Random) -> tuple[str, str]:
    a, b = rng.choice(PARTIES)
    n = rng.randint(2, 14)
    days = rng.choice([10, 15, 30, 45, 60, 90])
    state = rng.choice(["New York", "Delaware", "California", "Texas", "Ontario", "England and Wales"])
    kind = rng.randrange(5)
    if kind == 0:
        p = f"{n}. Termination."
        c = (f" Either party may terminate this Agreement upon {days} days' prior written notice to the other party."
             f" {a} may terminate this Agreement immediately if {b} materially breaches any provision hereof and fails to cure"
             f" such breach within {days // 2 or 5} days after receiving written notice thereof."
             f" Upon termination, all rights granted hereunder shall immediately cease.")
    elif kind == 1:
        p = f"{n}. Confidentiality."
        c = (f" {b} shall hold in strict confidence all Confidential Information disclosed by {a} and shall not disclose"
             f" such information to any third party without the prior written consent of {a}."
             f" The obligations in this Section shall survive for a period of {rng.randint(2, 7)} years following termination of this Agreement.")
    elif kind == 2:
        p = f"{n}. Governing Law."
        c = (f" This Agreement shall be governed by and construed in accordance with the laws of {state}, without regard to its"
             f" conflict of laws principles. Each party irrevocably submits to the exclusive jurisdiction of the courts located in {state}"
             f" for any dispute arising out of or relating to this Agreement.")
    elif kind == 3:
        p = f"{n}. Payment Terms."
        c = (f" {b} shall pay all undisputed invoices within {days} days of receipt. Late payments shall accrue interest at the rate"
             f" of {rng.choice(['1%', '1.5%', '2%'])} per month or the maximum rate permitted by law, whichever is less."
             f" All amounts are stated exclusive of applicable taxes, which shall be borne by {b}.")
    else:
        p = f"{n}. Limitation of Liability."
        c = (f" In no event shall {a} be liable to {b} for any indirect, incidental, special or consequential damages,"
             f" including loss of profits, arising out of this Agreement, even if advised of the possibility of such damages."
             f" The total liability of {a} shall not exceed the fees paid by {b} in the {rng.choice(['six', 'twelve', 'twenty-four'])}"
             f" months preceding the claim.")
    return p, c


def iter_licence_paragraphs(root: Path = Path("/usr/share/common-licenses")) -> Iterator[dict]:
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
        paras = [p for p in paras if len(p) >= 200]
        for i, para in enumerate(paras):
            # prompt: the first sentence(s) up to ~120 chars; completion: the rest of the paragraph.
            cut = para.find(". ", 60)
            if cut < 0 or cut > 240:
                cut = para.find(" ", 100)
            if cut < 0:
                continue
            cut += 1
            yield {"id": f"prose:lic:{path.name}:{i}", "prompt": para[:cut], "completion": para[cut:] + "\n"}


def gen_prose(n: int, rng: random.Random) -> Iterator[dict]:
    for i in range(n):
        p, c = _finance_doc(rng) if rng.random() < 0.5 else _legal_doc(rng)
        cut = c.find(". ") + 1  # move the first sentence into the prompt (more specific prompts)
        if cut > 0:
            p, c = p + c[:cut], c[cut:]
        yield {"id": f"prose:{i}", "prompt": p, "completion": c + "\n"}


# -------------------------------------------------------------------------------------- general
_ANIMALS = ["cat", "dog", "rabbit", "fox", "owl", "bear", "duck", "turtle", "mouse", "horse"]
_ADJ = ["little", "happy", "curious", "sleepy", "brave", "shy", "kind", "silly", "tiny", "old"]
_PLACES = ["park", "forest", "beach", "garden", "village", "river", "hill", "library", "kitchen", "market"]
_OBJECTS = ["red ball", "blue kite", "shiny stone", "big box", "warm blanket", "old map", "yellow hat",
            "wooden boat", "small key", "green leaf"]
_FEEL = ["happy", "sad", "scared", "excited", "proud", "tired", "surprised", "calm"]


def _story(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NAMES)
    an, adj, pl = rng.choice(_ANIMALS), rng.choice(_ADJ), rng.choice(_PLACES)
    ob, f1, f2 = rng.choice(_OBJECTS), rng.choice(_FEEL), rng.choice(_FEEL)
    friend = rng.choice([x for x in NAMES if x != n])
    p = rng.choice([f"Once upon a time, there was a {adj} {an} named {n}.",
                    f"One sunny day, {n} went to the {pl}.",
                    f"{n} had a {ob} that {rng.choice(['he', 'she', 'they'])} loved very much."])
    s = [f" {n} liked to play in the {pl} every morning.",
         f" One day, {n} found a {ob} near a tree.",
         f" {n} felt {f1} and ran to show {friend}.",
         rng.choice([f" \"Look what I found!\" said {n}.", f" {friend} smiled and said, \"What a nice {ob}!\"",
                     f" But the wind was strong, and the {ob} rolled away."]),
         rng.choice([f" They played together until the sun went down.", f" They looked everywhere and finally found it under a bench.",
                     f" {friend} helped {n} carry it home."]),
         f" At the end of the day, {n} felt {f2}.",
         rng.choice([" The end.", f" {n} learned that sharing makes everyone happy.", f" And they were friends forever."])]
    rng.shuffle(s[1:4])
    return p, "".join(s)


def _everyday(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NAMES)
    kind = rng.randrange(4)
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    if kind == 0:
        w = rng.choice(["sunny", "rainy", "cloudy", "windy", "snowy", "foggy"])
        t = rng.randint(-5, 35)
        return (f"The weather on {day} will be {w}.",
                f" Temperatures will reach about {t} degrees in the afternoon, and the evening will be"
                f" {rng.choice(['cool', 'mild', 'chilly', 'warm'])}. People going outside should"
                f" {rng.choice(['bring an umbrella', 'wear a coat', 'drink plenty of water', 'take care on the roads'])}.")
    if kind == 1:
        friend = rng.choice(NAMES)
        return (f"Dear {friend},",
                f" I hope you are doing well. Last {day} I visited the {rng.choice(_PLACES)} with my family."
                f" We had a lovely time and ate {rng.choice(['sandwiches', 'soup', 'ice cream', 'fresh bread'])}."
                f" I would love to see you again soon. Please write back when you can.\nBest wishes,\n{n}")
    if kind == 2:
        dish = rng.choice(["pancakes", "vegetable soup", "tomato pasta", "banana bread", "fried rice"])
        return (f"How to make {dish}.",
                f" First, gather the ingredients and wash your hands. Then mix everything in a large bowl."
                f" Cook it for about {rng.randint(5, 45)} minutes, stirring from time to time."
                f" Let it cool a little before serving. It is a good meal for a {rng.choice(['cold', 'busy', 'quiet'])} evening.")
    return (f"{n} woke up early on {day}.",
            f" After breakfast, {n} walked to the {rng.choice(_PLACES)} and met a few neighbours."
            f" They talked about the {rng.choice(['weather', 'news', 'garden', 'new shop', 'football match'])}."
            f" In the afternoon {n} read a book and later cooked dinner for friends.")


def iter_pydoc_paragraphs() -> Iterator[tuple[str, str]]:
    """English paragraphs from Python's own documentation topics (pydoc_data), no code lines."""
    try:
        from pydoc_data.topics import topics  # type: ignore
    except Exception:  # pragma: no cover - stripped interpreters
        return
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith((" ", "\t")) or ">>>" in para or len(para) < 200:
                continue
            para = re.sub(r"\s+", " ", para).strip()
            if "*" in para[:3]:
                continue
            cut = para.find(". ")
            if cut < 20 or cut > 250:
                cut = para.find(" ", 80)
            if cut < 0:
                continue
            yield para[:cut + 1], para[cut + 1:]


def iter_optional_general() -> Iterator[tuple[str, str]]:
    """Optional Debian sources: fortunes, python3.11-doc html. Skipped silently when absent."""
    for d in (Path("/usr/share/games/fortunes"), Path("/usr/share/fortune")):
        if d.is_dir():
            for path in sorted(d.iterdir()):
                if path.suffix or not path.is_file():
                    continue
                try:
                    text = path.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                for chunk in text.split("\n%\n"):
                    chunk = chunk.strip()
                    if 80 <= len(chunk) <= 1200:
                        cut = chunk.find(" ", 40)
                        if cut > 0:
                            yield chunk[:cut], chunk[cut:]
    ddir = Path("/usr/share/doc/python3.11/html")
    if ddir.is_dir():
        for path in sorted(ddir.rglob("*.html"))[:400]:
            try:
                raw = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for m in re.finditer(r"<p>(.*?)</p>", raw, flags=re.S):
                t = html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))
                t = re.sub(r"\s+", " ", t).strip()
                if len(t) >= 200:
                    cut = t.find(". ")
                    if 20 < cut < 250:
                        yield t[:cut + 1], t[cut + 1:]


def gen_general(cfg: CorpusConfig, rng: random.Random) -> Iterator[dict]:
    i = 0
    for _ in range(cfg.n_general):
        p, c = _story(rng) if rng.random() < 0.65 else _everyday(rng)
        yield {"id": f"general:gen:{i}", "prompt": p, "completion": c + "\n"}
        i += 1
    for j, (p, c) in enumerate(iter_pydoc_paragraphs()):
        if cfg.max_pydoc_paragraphs is not None and j >= cfg.max_pydoc_paragraphs:
            break
        yield {"id": f"general:pydoc:{j}", "prompt": p, "completion": c + "\n"}
    for j, (p, c) in enumerate(iter_optional_general()):
        if j >= 20000:
            break
        yield {"id": f"general:opt:{j}", "prompt": p, "completion": c + "\n"}


# ---------------------------------------------------------------------------------------- build
def _topic_source(topic: str, cfg: CorpusConfig) -> Iterable[dict]:
    rng = random.Random(f"{cfg.seed}:{topic}")
    if topic == "code":
        it: Iterable[dict] = iter_code_functions(max_files=cfg.max_code_files, seed=cfg.seed)
        if cfg.max_code_functions is not None:
            docs = list(it)
            random.Random(f"{cfg.seed}:codesel").shuffle(docs)
            it = sorted(docs[: cfg.max_code_functions], key=lambda d: d["id"])
        return it
    if topic == "math":
        return gen_math(cfg.n_math, rng)
    if topic == "sql":
        return gen_sql(cfg.n_sql, rng)
    if topic == "prose":
        lic = list(iter_licence_paragraphs())
        return list(gen_prose(cfg.n_prose, rng)) + lic
    if topic == "general":
        return gen_general(cfg, rng)
    raise ValueError(topic)


def build_corpus(out_dir: str | Path, cfg: CorpusConfig | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Write ``{topic}.{train,heldout}.jsonl`` under ``out_dir``; return per-set statistics.

    Exact-duplicate documents are dropped; a document whose text also appears in another
    split is kept only in the first split it was assigned to (train wins), so held-out
    prompts are never seen verbatim in training.
    """
    cfg = cfg or CorpusConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    for topic in ALL_SETS:
        docs = []
        seen: set[str] = set()
        for d in _topic_source(topic, cfg):
            text = d["prompt"] + d["completion"]
            key = hashlib.sha1(text.encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            d = {"id": d["id"], "topic": topic, "prompt": d["prompt"], "completion": d["completion"]}
            docs.append(d)
        frac = cfg.heldout_frac
        if docs:
            frac = max(frac, min(0.5, cfg.min_heldout / len(docs)))
        splits = {"train": [], "heldout": []}
        for d in docs:
            splits[_split_of(cfg.seed, d["id"], frac)].append(d)
        if topic == "code" and cfg.code_extra:
            extra = list(iter_code_functions(extra=True, max_files=cfg.max_code_files, seed=cfg.seed))
            random.Random(f"{cfg.seed}:codeextra").shuffle(extra)
            if cfg.max_code_extra is not None:
                extra = extra[: cfg.max_code_extra]
            held_texts = {d["prompt"] + d["completion"] for d in splits["heldout"]}
            for d in sorted(extra, key=lambda d: d["id"]):
                text = d["prompt"] + d["completion"]
                key = hashlib.sha1(text.encode()).hexdigest()
                if key in seen or text in held_texts:
                    continue
                seen.add(key)
                splits["train"].append({"id": d["id"], "topic": topic, "prompt": d["prompt"],
                                        "completion": d["completion"]})
        # held-out prompts must not occur as prompts in training (templated generators can collide)
        train_prompts = {d["prompt"] for d in splits["train"]}
        splits["heldout"] = [d for d in splits["heldout"] if d["prompt"] not in train_prompts]
        st = {}
        for split, rows in splits.items():
            with open(out / f"{topic}.{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            st[split] = {"docs": len(rows), "chars": sum(len(r["prompt"]) + len(r["completion"]) for r in rows)}
        stats[topic] = st
        log(f"corpus {topic}: train {st['train']['docs']} docs / {st['train']['chars'] / 1e6:.2f}M chars, "
            f"heldout {st['heldout']['docs']} docs")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def read_split(corpus_dir: str | Path, topic: str, split: str) -> list[dict]:
    with open(Path(corpus_dir) / f"{topic}.{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
