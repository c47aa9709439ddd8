"""Every shipped preset says where each of its values comes from.

Each leaf key line that sets a value (a `key: value`, a flow collection, a list item) carries an
end-of-line comment that cites a source (the seed papers, the authors' code, the papers they
build on) or says `assumed: <why>`. Exempt: the top-level `name` and the `paper:` block (the
published numbers, cited once by its `source` key). docs/fidelity.md collects the differences.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from phalanx.presets import PRESET_ROOT, list_presets

# What a comment may cite. A new source is added here, once, with its name as presets write it.
SOURCE = re.compile(
    r"\breport\b|DVERGE (authors|paper)|GAL paper|GDR (blog|preprint)|RRM (slides|authors)|TRS authors"
    r"|ADP (paper|authors)|Madry|Wong et al|Tramèr|Kurakin|Hinton|Croce|AutoAttack"
)
ASSUMED = re.compile(r"\bassumed: *\S")
EXEMPT_TOP = {"name", "paper"}


def _leaves(node: yaml.Node, path: str) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
    """(key path, node whose line starts the entry, value node) for every value-setting entry:
    a mapping key with a scalar or flow value, or a list item that is not itself a block mapping."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style:
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            if _is_block_collection(value):
                yield from _leaves(value, sub)
            else:
                yield sub, key, value
    elif isinstance(node, yaml.SequenceNode) and not node.flow_style:
        for i, item in enumerate(node.value):
            if _is_block_collection(item):
                yield from _leaves(item, f"{path}[{i}]")
            else:
                yield f"{path}[{i}]", item, item


def _is_block_collection(node: yaml.Node) -> bool:
    return isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style


def _trailing_comment(text: str, *, after_value: bool) -> str | None:
    """The end-of-line comment in `text`: what follows the first '#' that comes after whitespace
    outside quotes. `after_value`: `text` is what follows a value on its line; otherwise a line
    holding nothing before its '#' is a full-line comment, which cites nothing (None)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"" and (i == 0 or text[i - 1] in " \t[{,:"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[i + 1:].strip() if after_value or text[:i].strip() else None
    return None


def entry_comments(lines: list[str], first: yaml.Node, value: yaml.Node) -> list[str]:
    """The end-of-line comments an entry carries, on any of its lines (a multi-line flow value may
    carry it on its last line; a block scalar only on its `|`/`>` header line)."""
    start = first.start_mark.line
    if isinstance(value, yaml.ScalarNode) and value.style in ("|", ">"):
        header = lines[value.start_mark.line][value.start_mark.column + 1:]
        match = re.match(r"[-+0-9]*\s+#(.*)$", header)
        return [match.group(1).strip()] if match else []
    end, end_col = value.end_mark.line, value.end_mark.column
    if end > start and end_col == 0:  # the mark sits at the start of the next line
        end, end_col = end - 1, len(lines[end - 1])
    found = []
    for n in range(start, end + 1):
        # on the value's last line only what follows the value can be a comment
        text = lines[n][end_col:] if n == end else lines[n]
        comment = _trailing_comment(text, after_value=n == end)
        if comment is not None:
            found.append(comment)
    return found


def cites_a_source(comment: str) -> bool:
    return bool(SOURCE.search(comment) or ASSUMED.search(comment))


def unsourced_keys(text: str) -> list[str]:
    """`line N: key.path` for every value-setting entry without a source or `assumed:` comment."""
    root = yaml.compose(text)
    if root is None:
        return []
    lines = text.splitlines()
    missing = []
    for key, value in root.value if isinstance(root, yaml.MappingNode) else []:
        if key.value in EXEMPT_TOP:
            continue
        entries = _leaves(value, key.value) if _is_block_collection(value) else [(key.value, key, value)]
        for path, first, node in entries:
            if not any(cites_a_source(c) for c in entry_comments(lines, first, node)):
                missing.append(f"line {first.start_mark.line + 1}: {path}")
    return missing


PRESETS = list_presets()


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_value_says_where_it_comes_from(name):
    path = PRESET_ROOT / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    missing = unsourced_keys(text)
    assert not missing, (f"{path.relative_to(PRESET_ROOT.parent)}: these keys carry no source; end each "
                         "line with `# <source>` (e.g. `# report §3.1`) or `# assumed: <why>`:\n  "
                         + "\n  ".join(missing))
    paper = yaml.safe_load(text).get("paper")
    assert paper is None or "source" in paper, f"{name}: a `paper:` block must name its `source`"


def test_the_check_reads_lists_nested_mappings_and_multi_line_values():
    text = """\
name: x
seed: 0  # assumed: any seed
data:
  dataset: cifar10  # report §3.1
  augment: {crop_padding: 4,
            flip: true}  # DVERGE authors' utils.get_loaders
  root: "a # not a comment"
  val_size: 3 # a note, not a source
eval:
  attacks:
    - {name: fgsm, eps: 0.1}  # GAL paper §4.1
    - name: pgd-linf  # assumed: a check
      eps: 0.1
  # a full-line comment is no source for the next key
  examples: 1000
  note: >  # assumed: folded text
    text with # inside
  other: |
    # GAL paper, inside the block: content, not a comment
method:
  static_runs: [a,
                b]
  eps: 0.3  # GAL paper §4.2
paper:
  source: "x"
  rows: {a: [1]}
"""
    assert unsourced_keys(text) == [
        "line 7: data.root", "line 8: data.val_size", "line 13: eval.attacks[1].eps",
        "line 15: eval.examples", "line 18: eval.other", "line 21: method.static_runs",
    ]


def test_every_preset_file_is_checked():
    assert PRESETS and {Path(p).parts[0] for p in PRESETS} >= {"dverge-report", "gal-paper", "quickstart"}
