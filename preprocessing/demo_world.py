"""A world of fictional people for the offline demo: passages about them and questions on their facts.

Every name is built from random syllables, so no pretrained model can know a fact; a reader can only answer by
copying from a retrieved passage. Values are drawn from pools of 150+ invented names, so guessing is hopeless.
Everything is drawn from `random.Random(seed)` (the pretraining texts from a second generator seeded from
`seed`), so the same seed gives the same world.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field

RELATIONS = ("birthplace", "occupation", "founded", "birth_year", "dish")
LAYOUTS = ("biography", "facts")  # a person's facts in one passage, or one passage per fact
SECTIONS = {  # section titles of the "facts" layout
    "birthplace": "Origins",
    "occupation": "Career",
    "founded": "Legacy",
    "birth_year": "Early life",
    "dish": "Tastes",
}
POOL_SIZE = 200  # values per relation; >= 150 so that a closed-book guess is right well under 1% of the time

# Passage sentences: {s}/{s_low} are a subject (full name, first name or pronoun), {p} its possessive.
SENTENCES = {
    "birthplace": ["{s} was born in {v}.", "{s} is a native of the town of {v}.", "{p} birthplace is {v}."],
    "occupation": ["{s} works as {a} {v}.", "{s} earns a living as {a} {v}.", "By trade, {s_low} is {a} {v}."],
    "founded": ["{s} founded the {v}.", "{s} is the founder of the {v}.", "Later, {s_low} established the {v}."],
    "birth_year": ["{s} was born in the year {v}.", "{p} year of birth is {v}.", "{s} came into the world in {v}."],
    "dish": ["{p} favourite dish is {v}.", "{s} likes {v} more than any other dish.", "{s} is especially fond of {v}."],
}
QUESTIONS = {
    "birthplace": ["Where was {n} born?", "In which town was {n} born?", "What is the birthplace of {n}?"],
    "occupation": ["What does {n} work as?", "What is the occupation of {n}?", "What is {n}'s profession?"],
    "founded": [
        "Which organisation did {n} found?",
        "What did {n} found?",
        "{n} is the founder of which organisation?",
    ],
    "birth_year": ["In what year was {n} born?", "When was {n} born?", "What is {n}'s year of birth?"],
    "dish": ["What is {n}'s favourite dish?", "Which dish does {n} like best?", "What food does {n} enjoy most?"],
}
OCCUPATION_SUFFIXES = ["wright", "smith", "monger", "binder", "keeper", "weaver", "carver", "tender", "grinder"]
ORGANISATION_KINDS = ["Guild", "Society", "Company", "Institute", "League", "Collective", "Order", "Academy", "Circle"]
DISHES = ["stew", "pie", "bread", "soup", "cake", "dumplings", "porridge", "tart", "broth", "pudding"]
# Syllables s with both "s" and "##s" in bert-base-uncased's vocabulary (see build_name_makers).
PEOPLE_SYLLABLES = """
ba bai bain bal ban bar bas be bel ben bi bin bis bo bon bra bro bu bus da dai dal dan dar das de del den der des di
din do don dos du dun fa fan far fe fen fi fin for fu fur ga gal gan gas ge gel gen gi gil gin go grin gu gun gus ka
kai kan ke ken ki kin ko ku la lai lal lan las le len les li lin lo lok los lou lu ma mail main mal man mar mas me mel
men mer mi min mir mis mo mon mu na nail nan nas ne nes ni nik no non nor nos nu pa pal pan par pas pe pen per pi pin
po pol por pour pu ra rai rail rain ran ras re ren res ri ro ron ru run rus sa sai sal san sar sas se sen ser si sin
sir sis so sol son su sul sun sur ta tai tail tal tan tar te tel ten ter tha than thor ti tin tis to ton tor tour tu
va val van var ve vi vin vis vo von vu za ze zen zu
""".split()
TOWN_SUFFIXES = ["", "", "", "holm", "wick", "mere", "stad", "ford"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]
EMBLEMS = ["heron", "fox", "lantern", "oak leaf", "silver key", "bell", "wheel", "hammer", "star", "boat"]


@dataclass
class Person:
    """One fictional person: name parts, pronouns and a value for every relation."""

    first: str
    last: str
    pronoun: str  # "she" or "he"
    facts: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class World:
    """Passages and qa examples, plus what a tokenizer needs to split invented words into their syllables."""

    passages: list[dict] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    dev: list[dict] = field(default_factory=list)
    pretraining: list[dict] = field(default_factory=list)  # train people's facts only (see pretraining_texts)
    invented_words: set[str] = field(default_factory=set)  # every invented word as it appears in the text
    word_pieces: list[str] = field(default_factory=list)  # syllables and suffixes that invented words are made of


class NameMaker:
    """Invents unique words from a small syllable inventory, so a tokenizer can learn the syllables as pieces."""

    def __init__(self, rng: random.Random, syllables: list[str], used: set[str]) -> None:
        self.rng = rng
        self.syllables = syllables
        self.used = used  # shared between makers: two inventories can still spell the same word

    def word(self, min_syllables: int = 2, max_syllables: int = 3) -> str:
        """A new lowercase word never returned before by this maker."""
        while True:
            n = self.rng.randint(min_syllables, max_syllables)
            candidate = "".join(self.rng.choice(self.syllables) for _ in range(n))
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate

    def pool(self, size: int, make: Callable[[str], str], syllables: tuple[int, int] = (2, 2)) -> list[str]:
        """`size` distinct values, each `make(word)` of a fresh word; short words keep answers short in tokens."""
        values: dict[str, None] = {}  # ordered set: a suffix could make two fresh words equal
        while len(values) < size:
            values[make(self.word(*syllables))] = None
        return list(values)


def build_name_makers(rng: random.Random, n_value_syllables: int = 120) -> tuple[NameMaker, NameMaker]:
    """Makers for people's names and for values, from disjoint syllables.

    People's syllables are single wordpieces of BERT's uncased vocabulary, so a MiniLM/BERT retriever sees a name
    as a few distinct pieces instead of fragments shared with every other invented word; that lifts MiniLM's dev
    recall@5 from ~0.90 to ~0.97. Values use the other syllables, so a query's name shares few pieces with them.
    """
    onsets = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z"]
    inventory = sorted({o + v + c for o in onsets for v in ["a", "e", "i", "o", "u", "ai", "ou"] for c in "nrlsk"})
    inventory += sorted({o + v for o in onsets for v in ["a", "e", "i", "o", "u", "ai", "ou"]})
    value_syllables = rng.sample([s for s in inventory if s not in PEOPLE_SYLLABLES], n_value_syllables)
    used: set[str] = set()
    return NameMaker(rng, PEOPLE_SYLLABLES, used), NameMaker(rng, value_syllables, used)


def build_pools(names: NameMaker, rng: random.Random, n_entities: int) -> dict[str, list[str]]:
    """Value pools per relation (plus helper pools); organisations are unique per founder, hence >= n_entities."""
    return {
        "birthplace": names.pool(POOL_SIZE, lambda w: w.capitalize() + rng.choice(TOWN_SUFFIXES)),
        "occupation": names.pool(POOL_SIZE, lambda w: w + rng.choice(OCCUPATION_SUFFIXES), (1, 2)),
        "founded": names.pool(
            max(POOL_SIZE, n_entities), lambda w: f"{w.capitalize()} {rng.choice(ORGANISATION_KINDS)}", (2, 3)
        ),
        "birth_year": [str(year) for year in range(1650, 1650 + max(POOL_SIZE, 300))],
        "dish": names.pool(POOL_SIZE, lambda w: f"{w} {rng.choice(DISHES)}"),
        "region": names.pool(40, str.capitalize),
        "river": names.pool(40, str.capitalize),
    }


def build_people(names: NameMaker, rng: random.Random, pools: dict[str, list[str]], n: int) -> list[Person]:
    """`n` people with unique full names; first and last names come from pools, so some people share one."""
    firsts = [names.word(2, 3).capitalize() for _ in range(max(20, n))]
    lasts = [names.word(3, 3).capitalize() for _ in range(max(20, n))]
    organisations = rng.sample(pools["founded"], n)
    people, seen = [], set()
    while len(people) < n:
        first, last = rng.choice(firsts), rng.choice(lasts)
        if (first, last) in seen:
            continue
        seen.add((first, last))
        facts = {r: rng.choice(pools[r]) for r in RELATIONS if r != "founded"}
        facts["founded"] = organisations[len(people)]
        people.append(Person(first, last, rng.choice(["she", "he"]), facts))
    return people


def references(person: Person, rng: random.Random, first_sentence: bool) -> dict[str, str]:
    """Ways to refer to the person in one sentence: the full name first, then first name or pronoun."""
    if first_sentence:
        subject = person.name
    else:
        subject = rng.choice([person.name, person.name, person.first, person.pronoun])
    possessive_pronoun = "her" if person.pronoun == "she" else "his"
    is_pronoun = subject == person.pronoun
    possessive = possessive_pronoun if is_pronoun else f"{subject}'s"
    return {
        "s": subject.capitalize() if is_pronoun else subject,
        "s_low": subject,
        "p": possessive.capitalize() if is_pronoun else possessive,
    }


def fact_sentence(person: Person, relation: str, rng: random.Random) -> str:
    """One fact in a fixed wording, with the full name as subject."""
    value = person.facts[relation]
    article = "an" if value[0] in "aeiou" else "a"
    return SENTENCES[relation][0].format(v=value, a=article, **references(person, rng, True))


def person_passages(person: Person, rng: random.Random, layout: str) -> dict[str, dict]:
    """The passage holding each relation's fact: one biography for all, or one short passage per fact.

    A fixed wording lets the demo's reader, trained from scratch in minutes, learn to copy answers; the questions
    still come in several wordings. With the "facts" layout the reader copies from a one-sentence passage and which
    fact to read is the retriever's job: a reader from scratch learns that far faster than picking one sentence out
    of five (its loss on a gold biography was still that of a closed-book model after 1,500 steps).
    """
    if layout == "facts":
        return {
            r: {"title": person.name, "section": SECTIONS[r], "text": fact_sentence(person, r, rng)} for r in RELATIONS
        }
    text = " ".join(fact_sentence(person, r, rng) for r in RELATIONS)
    biography = {"title": person.name, "section": rng.choice(["Biography", ""]), "text": text}
    return dict.fromkeys(RELATIONS, biography)


def town_passage(town: str, people: list[Person], pools: dict[str, list[str]], rng: random.Random) -> str:
    """Facts about a town that name two people, in random order (as long as a biography: see distractor_passages)."""
    residents = " and ".join(r.name for r in rng.sample(people, min(2, len(people))))
    sentences = [
        f"It lies on the river {rng.choice(pools['river'])}.",
        f"About {rng.randint(3, 90) * 100} people live there.",
        f"Notable residents include {residents}.",
        f"The town is known for its {rng.choice(pools['dish'])}.",
        f"Its market is held every {rng.choice(WEEKDAYS)}.",
        f"The town hall was built in {rng.choice(pools['birth_year'])}.",
    ]
    rng.shuffle(sentences)
    return " ".join([f"{town} is a town in the {rng.choice(pools['region'])} region."] + sentences)


def organisation_passage(
    organisation: str, people: list[Person], pools: dict[str, list[str]], rng: random.Random
) -> str:
    """Facts about an organisation (years, towns, a leader who is not its founder), in random order."""
    sentences = [
        f"It was established in {rng.choice(pools['birth_year'])}.",
        f"It has about {rng.randint(12, 900)} members, who meet every {rng.choice(SEASONS)}.",
        f"Its emblem is a {rng.choice(EMBLEMS)}.",
        f"It is currently led by {rng.choice(people).name}.",
        f"It publishes a yearly report on {rng.choice(pools['occupation'])}s.",
        f"A second office opened in {rng.choice(pools['birthplace'])} in {rng.choice(pools['birth_year'])}.",
    ]
    rng.shuffle(sentences)
    return " ".join([f"The {organisation} is based in {rng.choice(pools['birthplace'])}."] + sentences)


def distractor_passages(people: list[Person], pools: dict[str, list[str]], rng: random.Random) -> list[dict]:
    """Passages about towns and organisations that share names and words with the questions.

    They are as long as biographies on purpose: with unnormalised dot products, a short passage gets a larger
    mean-pooled embedding and would outscore the gold passage for many queries (hubness).
    """
    passages = []
    towns = sorted({p.facts["birthplace"] for p in people})
    for town in rng.sample(towns, min(len(towns), max(1, len(people) // 3))):
        text = town_passage(town, people, pools, rng)
        passages.append({"title": town, "section": rng.choice(["", "Geography"]), "text": text})
    for person in rng.sample(people, max(1, len(people) // 4)):
        organisation = person.facts["founded"]
        text = organisation_passage(organisation, people, pools, rng)
        passages.append({"title": organisation, "section": rng.choice(["", "History"]), "text": text})
    return passages


def pretraining_texts(people: list[Person], rng: random.Random) -> list[dict]:
    """Text for MLM pretraining: every fact of `people`, one sentence a row as the "facts" passages word it, shuffled.

    Ids are "pretrain-N", never a passage's id, so retrieval does not filter out the index's copy of the fact: a
    masked span can be copied from it, the skill QA needs. A five-fact biography per row, read with its five fact
    passages, made a pretraining step ~6x as costly and taught no copying in the demo's budget (BENCHMARKS.md).
    Callers pass train people only, so pretraining never shows the reader a dev answer.
    """
    rows = [
        {"title": person.name, "section": SECTIONS[r], "text": fact_sentence(person, r, rng)}
        for person in people
        for r in RELATIONS
    ]
    rng.shuffle(rows)
    return [{"id": f"pretrain-{i}"} | row for i, row in enumerate(rows)]


def questions_for(person: Person, gold: dict[str, dict], rng: random.Random, per_fact: float) -> list[dict]:
    """One question per fact, and a second with another template with probability `per_fact - 1`."""
    examples = []
    for relation in RELATIONS:
        n_questions = 1 + (rng.random() < per_fact - 1)
        for template in rng.sample(QUESTIONS[relation], n_questions):
            examples.append(
                {
                    "question": template.format(n=person.name),
                    "answers": [person.facts[relation]],
                    "gold_ids": [gold[relation]["id"]],
                }
            )
    return examples


def build_world(
    seed: int, n_entities: int = 1600, n_dev_people: int = 40, train_per_fact: float = 1.0, layout: str = "biography"
) -> World:
    """The whole demo world. Dev questions are about people that no train question mentions.

    Each train fact is asked about about once: with many people and few repeats, memorising facts does not pay and a
    reader trained from scratch has to learn to copy answers from the passages it is given.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    rng = random.Random(seed)
    people_names, value_names = build_name_makers(rng)
    pools = build_pools(value_names, rng, n_entities)
    people = build_people(people_names, rng, pools, n_entities)
    gold = [person_passages(p, rng, layout) for p in people]  # per person: relation -> passage
    own = [list({id(passage): passage for passage in g.values()}.values()) for g in gold]
    passages = [passage for ps in own for passage in ps] + distractor_passages(people, pools, rng)
    order = list(range(len(passages)))
    rng.shuffle(order)  # ids must not reveal which passages are biographies
    for new_id, index in enumerate(order):
        passages[index]["id"] = f"demo-{new_id}"
    n_dev = max(1, min(n_dev_people, n_entities // 10))
    key_order = ("id", "title", "section", "text")
    world = World(passages=sorted(({k: p[k] for k in key_order} for p in passages), key=lambda p: int(p["id"][5:])))
    for i, person in enumerate(people):
        split = world.dev if i < n_dev else world.train  # people are already in random order
        split.extend(questions_for(person, gold[i], rng, 1.0 if i < n_dev else train_per_fact))
    rng.shuffle(world.train)
    for split_name, examples in (("train", world.train), ("dev", world.dev)):
        for j, example in enumerate(examples):
            example["id"] = f"{split_name}-{j}"
            example["gold_ids"] = example.pop("gold_ids")  # key order as in the qa task format
    world.invented_words = {part for p in people for part in (p.first, p.last)}
    world.invented_words |= {v.split()[0] for name, pool in pools.items() if name != "birth_year" for v in pool}
    suffixes = [suffix for suffix in TOWN_SUFFIXES + OCCUPATION_SUFFIXES if suffix]
    world.word_pieces = sorted(set(people_names.syllables + value_names.syllables + suffixes))
    # Its own generator, drawn from last: the passages and questions stay those of worlds built before it existed.
    world.pretraining = pretraining_texts(people[n_dev:], random.Random(f"{seed}-pretraining"))
    return world
