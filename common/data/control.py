"""Control codes (DistilDP): a record's label, then a blank line, then its text.

The teacher rounds train on ``with_control_code(label, text)``; synthesis prompts the DP teacher
with ``control_prompt(label, bos)`` (exactly the prefix it was trained on) and saves
``strip_control_code(label, continuation)``. A record without a label (``None``) is trained
on its text alone and prompted with the BOS token.

A label must be a non-empty string without the separator in it and without a trailing
newline: either would make ``label + SEPARATOR`` end in a blank line at a different place
than the one the text starts at, so the prefix could not be told from the text.
"""

from __future__ import annotations

from common.errors import ConfigError, DataError

SEPARATOR = "\n\n"


class ControlCodeError(DataError, ValueError):
    """A label that cannot serve as a control code (a ``ValueError`` and a one-line ``DataError``)."""


def validate_label(label) -> str | None:
    """``label`` unchanged when usable as a control code (``None`` = unconditional), else ``ControlCodeError``."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise ControlCodeError(f"label {label!r} is {type(label).__name__}, not a string; labels must be text")
    if not label.strip():
        raise ControlCodeError(f"label {label!r} is empty or whitespace only; give every label some text "
                               "(or no label at all)")
    if SEPARATOR in label:
        raise ControlCodeError(f"label {label!r} contains the control-code separator (a blank line, "
                               f"{SEPARATOR!r}); remove blank lines from the label field")
    if label.endswith("\n"):
        raise ControlCodeError(f"label {label!r} ends with a newline, which would run into the separator "
                               f"{SEPARATOR!r}; strip the label")
    return label


def with_control_code(label: str | None, text: str) -> str:
    """The training text: ``label + SEPARATOR + text``, or ``text`` when ``label`` is None."""
    if validate_label(label) is None:
        return text
    return label + SEPARATOR + text


def control_prompt(label: str | None, bos: str) -> str:
    """The generation prompt: ``label + SEPARATOR``, or the BOS token text when ``label`` is None."""
    if validate_label(label) is None:
        if not isinstance(bos, str) or not bos:
            raise ControlCodeError(f"bos={bos!r}: an unconditional prompt needs the BOS token's text "
                                   "(e.g. tokenizer.bos_token)")
        return bos
    return label + SEPARATOR


def strip_control_code(label: str | None, generated: str, bos: str | None = None) -> str:
    """The saved text of a generation: the control code removed, surrounding whitespace stripped.

    ``generated`` is normally the continuation alone (``TextGenerator`` returns no prompt), so
    this mostly strips whitespace; a backend that echoes its prompt (``label + SEPARATOR`` or the
    ``bos`` text) gets that prefix removed too. Text after the prefix is never altered.
    """
    validate_label(label)
    if label is not None and generated.startswith(label + SEPARATOR):
        generated = generated[len(label) + len(SEPARATOR):]
    elif label is None and bos and generated.startswith(bos):
        generated = generated[len(bos):]
    return generated.strip()


def check_label_field(records, path, label_field: str) -> None:
    """Control codes need a label on every record: say which record lacks one, before any work."""
    for i, record in enumerate(records):
        if record.label is None:
            raise ConfigError(f"{path}: record {i + 1} has no {label_field!r} field (label-field = {label_field!r}); "
                              "add the field to every record, set label-field to the right name, or use "
                              "prompt-source = bos with label-field = \"\"")


def load_model_texts(path, text_field: str = "text", label_field: str = "") -> list[str]:
    """A file's records as the model sees them: with control codes (label + blank line + text)
    when ``label_field`` is set, exactly as the synthesis phase will prompt the teacher."""
    from common.data.loading import load_records

    if not label_field:
        return [r.text for r in load_records(path, field=text_field)]
    records = load_records(path, field=text_field, label_field=label_field)
    check_label_field(records, path, label_field)
    return [with_control_code(r.label, r.text) for r in records]
