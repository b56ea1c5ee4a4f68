"""Prompt templates: how a problem becomes the chat messages a model sees.

Generation, SFT and evaluation all render prompts here, so a student is trained and tested on
exactly the text its teacher was asked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    user: str
    system: str | None = None

    def messages(self, problem: str) -> list[dict[str, str]]:
        user = {"role": "user", "content": self.user.format(problem=problem)}
        return [{"role": "system", "content": self.system}, user] if self.system else [user]

    def render(self, tokenizer, problem: str) -> str:
        """The prompt text a model sees: its chat template on these messages, ready to answer."""
        return tokenizer.apply_chat_template(
            self.messages(problem), tokenize=False, add_generation_prompt=True
        )


TEMPLATES: dict[str, Template] = {
    # SimpleRL-Zoo's template, used by the W2SR paper for teachers and students alike.
    "paper": Template(
        system="You are a helpful assistant.",
        user="{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    ),
    "no_system": Template(
        user="{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    ),
    # The bare problem, for models whose chat template or task carries its own format.
    "plain": Template(user="{problem}"),
}
