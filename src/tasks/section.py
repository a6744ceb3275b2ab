"""Wikipedia section generation on the passage corpus: write a section's `text` from "{title}, {section}".

Rows without a `section` (or with an empty one) are skipped: they are ordinary corpus passages, not mistakes.
"""

import random

from src.errors import UserError
from src.tasks.base import Example
from src.tasks.lm import CorpusTask, gold


class Task(CorpusTask):
    name = "section"

    def process(self, raw: dict, where: str, rng: random.Random) -> Example | None:
        text = self.usable_text(raw, where)
        passage_id = self.passage_id(raw, where)
        section = raw.get("section")
        if section is not None and not isinstance(section, str):
            raise UserError(f"{where}: field 'section' of task 'section' must be a string")
        if text is None or not section or not section.strip():
            return None
        query = f"{self.require(raw, 'title', where)}, {section}"
        return Example(query, text, [gold(text)], self.file_passages(raw, where), {"id": passage_id})
