"""The base of every typed config section: what fingerprints hash of a section, and the error a
config that cannot run ends in. Sections live with what reads them (`w2sr.config` for the
experiment, `w2sr.data.sources` for prompt sources)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending key."""


def first_line(error: BaseException) -> str:
    """An error's first line (its type when it says nothing), for one-line messages."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields that say how a stage runs, not what it produces. Fingerprints leave them out, so a
    # rerun with more replicas or another checkpoint cadence resumes instead of starting over.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()
    # Fields added after run dirs existed whose default reproduces what those runs made: left out
    # of fingerprints while at their default, so the artifacts of those runs are still found.
    SILENT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset()

    def outcome(self) -> dict[str, Any]:
        """The fields that decide a stage's outputs, as JSON values (what fingerprints hash)."""
        silent = {
            name
            for name in self.SILENT_AT_DEFAULT
            if getattr(self, name)
            == type(self).model_fields[name].get_default(call_default_factory=True)
        }
        data = self.model_dump(mode="json", exclude=set(self.OPERATIONAL) | silent)
        for name in data:
            value = getattr(self, name)
            if isinstance(value, Strict):
                data[name] = value.outcome()
        return data
