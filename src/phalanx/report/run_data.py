"""Reading a run directory for a report: its config, metrics, evaluations and analysis, each file
checked; a missing or damaged file is recorded (the report says what it skipped), never fatal."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phalanx.errors import UsageError
from phalanx.eval.protocols import LABELS
from phalanx.files import DamagedFileError, DamagedFileWarning, loads_checked, read_jsonl
from phalanx.runs import analysis_path, config_path, eval_dir, metrics_path

WHITE_BOX = "white-box"  # the `kind` of a white-box evaluation document


@dataclass
class RunData:
    """What a run directory holds, as far as it could be read; `missing` says what could not."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evals: list[tuple[str, dict[str, Any]]]  # (file name, document with valid `results` only)
    missing: list[str] = field(default_factory=list)
    analysis: dict[str, Any] | None = None  # analysis/gradients.json with only its usable parts


def read_run_data(run_dir: str | Path) -> RunData:
    """Everything the report needs from `run_dir`, tolerating absent or malformed files."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"run directory {str(path)!r} does not exist or is not a directory")
    missing: list[str] = []
    config = _read_config(config_path(path), missing)
    metrics = _read_metrics(metrics_path(path), missing)
    evals = _read_evals(eval_dir(path), missing)
    analysis = _read_analysis(analysis_path(path), missing)
    from phalanx.runs import warn_if_in_use

    last = max((int(m["epoch"]) for m in metrics), default=0)
    warn_if_in_use(path, f"its metrics through epoch {last} and the evaluations in eval/ as they are")
    name = str(config.get("name") or path.name)
    return RunData(path, name, config, metrics, evals, missing, analysis)


def _read_config(path: Path, missing: list[str]) -> dict[str, Any]:
    if not path.is_file():
        missing.append("no config.yaml: run settings unknown")
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        missing.append(f"config.yaml could not be read ({type(err).__name__}): run settings unknown")
        return {}
    if not isinstance(cfg, dict):
        missing.append("config.yaml is not a mapping: run settings unknown")
        return {}
    return cfg


def _read_metrics(path: Path, missing: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        missing.append("no metrics.jsonl: training curves and diagnostics skipped")
        return []
    values, damaged = read_jsonl(path)
    for message in damaged:  # counted in the report's note below, named in a warning
        warnings.warn(f"{message}: it is left out of the report", DamagedFileWarning, stacklevel=3)
    rows = [row for row in values if isinstance(row, dict) and is_number(row.get("epoch"))]
    bad = len(values) - len(rows) + len(damaged)
    if bad:
        missing.append(f"{bad} unreadable line(s) of metrics.jsonl skipped")
    if not rows:
        missing.append("metrics.jsonl holds no epoch: training curves and diagnostics skipped")
    return rows


def _read_evals(eval_dir: Path, missing: list[str]) -> list[tuple[str, dict[str, Any]]]:
    files = sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []
    if not files:
        missing.append("no eval/*.json: accuracy tables and robustness curves skipped "
                       "(run `phalanx eval` on this run directory)")
        return []
    docs = []
    for file in files:
        try:
            doc = loads_checked(file.read_text(encoding="utf-8"), file)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            missing.append(f"eval/{file.name} could not be read ({type(err).__name__}): skipped")
            continue
        except DamagedFileError as err:
            _damaged(f"{err}: it is left out of the report (run `phalanx eval` again to rewrite it)", missing)
            continue
        results = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(results, list):
            missing.append(f"eval/{file.name} has no `results` list: skipped")
            continue
        records = [r for r in (_clean_record(r, doc, file) for r in results) if r is not None]
        if len(records) < len(results):
            missing.append(f"eval/{file.name}: {len(results) - len(records)} malformed record(s) skipped")
        if records:
            docs.append((file.name, {**doc, "results": records}))
        else:
            missing.append(f"eval/{file.name} holds no usable record: skipped")
    return docs


def _read_analysis(path: Path, missing: list[str]) -> dict[str, Any] | None:
    """`phalanx analyze`'s document keeping only well-formed parts: `coherence` (finite numbers) and
    `gaas` (results with numeric k, eps, p_all); None when neither is usable."""
    skipped = "gradient-alignment figures skipped"
    if not path.is_file():
        missing.append(f"no analysis/gradients.json: {skipped} (run `phalanx analyze` on this run directory)")
        return None
    try:
        doc = loads_checked(path.read_text(encoding="utf-8"), path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        missing.append(f"analysis/gradients.json could not be read ({type(err).__name__}): {skipped}")
        return None
    except DamagedFileError as err:
        _damaged(f"{err}: {skipped} (run `phalanx analyze` again to rewrite it)", missing)
        return None
    if not isinstance(doc, dict):
        missing.append(f"analysis/gradients.json is not a JSON object: {skipped}")
        return None
    coh = doc.get("coherence")
    usable = isinstance(coh, list) and bool(coh) and all(map(is_number, coh))
    if coh is not None and not usable:
        missing.append("analysis/gradients.json: malformed `coherence` list, coherence histogram skipped")
    coh = [float(v) for v in coh] if usable else None
    gaas = doc.get("gaas")
    results = gaas.get("results") if isinstance(gaas, dict) else None
    results = results if isinstance(results, list) else []
    results = [r for r in results
               if isinstance(r, dict) and all(is_number(r.get(k)) for k in ("k", "eps", "p_all"))]
    if gaas is not None and not results:
        missing.append("analysis/gradients.json: malformed `gaas` results, GAAS curves skipped")
    if coh is None and not results:
        missing.append(f"analysis/gradients.json holds neither a coherence list nor GAAS results: {skipped}")
        return None
    return {**doc, "coherence": coh, "gaas": {**gaas, "results": results} if results else None}


def _damaged(message: str, missing: list[str]) -> None:
    """A file or line that changed after phalanx wrote it: said in the report and as a warning."""
    missing.append(message)
    warnings.warn(message, DamagedFileWarning, stacklevel=4)


PROTOCOL_LABELS = {protocol.value: label for protocol, label in LABELS.items()}


def _clean_record(rec: Any, doc: Mapping[str, Any], file: Path) -> dict[str, Any] | None:
    """The record with `eps` and `source` filled in, or None when it lacks what a table needs."""
    if not (isinstance(rec, dict) and isinstance(rec.get("model"), str) and isinstance(rec.get("attack"), str)
            and is_number(rec.get("accuracy"))):
        return None
    eps = rec.get("eps", 0.0 if rec["attack"] == "clean" else None)
    if not is_number(eps):
        return None
    source = rec.get("source") or doc.get("kind") or (WHITE_BOX if file.stem == "whitebox" else file.stem)
    protocol = rec.get("protocol", "standard")
    if protocol != "standard":  # a source's own protocol is never shown in, or compared with, the standard tables
        source = f"{source}, {PROTOCOL_LABELS.get(protocol, protocol)}"
    warnings = rec.get("warnings") or []
    if isinstance(warnings, str):
        warnings = [warnings]
    return {**rec, "eps": 0.0 if rec["attack"] == "clean" else float(eps), "source": str(source),
            "warnings": [str(w) for w in warnings]}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
