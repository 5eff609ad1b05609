"""Results tables: row names, the per-run table, and the one aggregator over runs (seeds).

A leaf module (standard library only): generations.py writes results.md with it,
report.py and evaluate.py print the same tables from what a run left on disk. What
a table shows is a task's business (tasks/): it passes its `Metric`s, and nothing
here knows about images or tokens.

Every row has one name, the same in every table, plot, log line and JSON file:
Teacher, BAN-k, BANE-k (the paper's Ens*k: the ensemble of BAN-1..k, Eq. 4) and
Baseline. It is also the row's *key*, used to match rows across runs and to place
them in plots. An ensemble's members are shown in its Arch cell ("ensemble of
1,2"; T = the teacher, with --ensemble_include_teacher).

`results` below is the dict written to results.json: {"generations": [metrics of
gen 0..N], "ensembles": [metrics of BANE-2..N], "baseline": metrics or None}.
"""

import dataclasses
import statistics
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Metric:
  """One number per row of a results table.

  Attributes:
    key: its field in metrics.json / results.json (e.g. "test_error").
    title: column title, with its unit (e.g. "Test error (%)").
    percent: shown x100 (fractions such as errors); means, stds and deltas over
      runs are in the shown unit too.
    derive: how to read it from an entry that predates the field, or whose field
      is derived (e.g. val error = 1 - val_accuracy); None: `entry.get(key)`.
    text: how the metric reads in a sentence ("test error").
  """

  key: str
  title: str
  percent: bool = False
  derive: Optional[Callable[[dict], Optional[float]]] = None
  text: str = ""

  def value(self, entry: dict) -> Optional[float]:
    """The metric of one row in table units (x100 for percentages), or None."""
    v = self.derive(entry) if self.derive is not None else entry.get(self.key)
    if v is None:
      return None
    return 100.0 * float(v) if self.percent else float(v)


def format_params(n: int) -> str:
  """1490 -> "1.5k"; 36_500_000 -> "36.50M"."""
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def ensemble_arch(members) -> str:
  """An ensemble's Arch cell: its members, T for the teacher ("ensemble of T,1,2")."""
  return "ensemble of " + ",".join("T" if m == 0 else str(m) for m in members)


@dataclasses.dataclass(frozen=True)
class Row:
  key: str  # Teacher, BAN-k, BANE-k, Baseline: the same in every run of an experiment
  label: str  # what tables show
  arch: str
  params: str  # formatted, "" for ensembles
  entry: dict  # the row's metrics.json fields


def generation_name(gen) -> str:
  """The row name of generation `gen`: 0 -> Teacher, k -> BAN-k, "baseline" -> Baseline."""
  return "Baseline" if gen == "baseline" else "Teacher" if gen == 0 else f"BAN-{gen}"


def rows(results: dict) -> list:
  """The rows of one run in table order: Teacher, BAN-1..N, BANE-2..N, Baseline."""
  out = []
  mark = lambda entry: " (damaged)" if entry.get("damaged") else ""
  for g in results.get("generations", []):
    key = generation_name(g["gen"])
    out.append(Row(key, key + mark(g), g.get("arch", "?"), format_params(g.get("params", 0)), g))
  for e in results.get("ensembles", []):
    key = e.get("name") or f"BANE-{max(e['members'])}"
    out.append(Row(key, key + mark(e), ensemble_arch(e.get("members", [])), "", e))
  b = results.get("baseline")
  if b:
    out.append(
      Row(
        "Baseline", "Baseline" + mark(b), b.get("arch", "?"), format_params(b.get("params", 0)), b
      )
    )
  return out


def gen_of(key: str) -> Optional[int]:
  """Teacher -> 0, BAN-k and BANE-k -> k, Baseline -> None (its x position in plots)."""
  if key == "Teacher":
    return 0
  if key.startswith("BAN"):
    return int(key.split("-")[1])
  return None


def _fmt(v: Optional[float]) -> str:
  return "" if v is None else f"{v:.2f}"


REFERENCES = (("vs_teacher", "teacher"), ("vs_baseline", "baseline"))


def _p(p) -> str:
  if p is None:
    return ""
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_cells(c: Optional[dict]) -> list:
  """[Δ with its 95% CI, p, verdict] of a stats.Comparison.to_json() (blank cells for None)."""
  if not c:
    return ["", "", ""]
  lo, hi = c["ci95"]
  ci = "" if lo is None or hi is None else f" [{lo:+.2f}, {hi:+.2f}]"
  return [f"{c['delta']:+.2f}{ci}", _p(c.get("p")), c["verdict"]]


def _comparison_columns(entries) -> list:
  """The (field, reference) pairs of REFERENCES that some entry carries."""
  return [(f, ref) for f, ref in REFERENCES if any(e.get(f) for e in entries)]


def table(results: dict, headline: Metric, extra=()) -> str:
  """The per-run markdown table: headline, delta vs the teacher, then `extra` columns.

  Rows that carry paired comparisons (`vs_teacher`, `vs_baseline`: stats.Comparison
  JSON, added by report.write_results from the stored per-example outputs) get Δ
  with its 95% CI, p and verdict per reference instead of the plain difference.
  Extra columns that no row has are left out.
  """
  rs = rows(results)
  base = headline.value(rs[0].entry) if rs and rs[0].key == "Teacher" else None
  extra = [m for m in extra if any(m.value(r.entry) is not None for r in rs)]
  paired = _comparison_columns([r.entry for r in rs])
  compared = []
  for _, ref in paired:
    compared += [f"Δ vs {ref} [95% CI]", "p", f"vs {ref}"]
  if not paired:
    compared = ["Δ vs teacher"]
  head = ["Model", "Arch", "Params", headline.title] + compared + [m.title for m in extra]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rs:
    v = headline.value(r.entry)
    if paired:
      cells = [c for f, _ in paired for c in comparison_cells(r.entry.get(f))]
    else:
      cells = ["" if base is None or v is None or r.key == "Teacher" else f"{v - base:+.2f}"]
    cells = [r.label, r.arch, r.params, _fmt(v)] + cells + [_fmt(m.value(r.entry)) for m in extra]
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"- {r.key}: {r.entry['damaged']}" for r in rs if r.entry.get("damaged")]
  if notes:
    lines += [
      "",
      "Damaged rows (kept, not dropped; fix the file named and rerun to refresh them):",
    ] + notes
  return "\n".join(lines) + "\n"


def aggregate(per_run: list, metric: Metric) -> list:
  """Mean and sample std (ddof=1; 0 for one run) of `metric` per row over runs.

  Args:
    per_run: results dicts, one per run (seed); rows are matched by key, in the
      first run's order, then any row only later runs have.
    metric: what to aggregate (values in its table units).

  Returns:
    [{"name": label, "key", "arch", "params", "n", "metric": metric.key,
      "mean", "std", "values": [per run], "deltas_vs_teacher": [per run],
      "deltas_vs_baseline": [per run]}]; the deltas are the runs' paired Δ
    (`vs_teacher`/`vs_baseline` of their results.json), one per run that has it.
  """
  order, values, first = [], {}, {}
  deltas = {}
  for results in per_run:
    for r in rows(results):
      v = metric.value(r.entry)
      if v is None:
        continue
      if r.key not in values:
        order.append(r.key)
        values[r.key], first[r.key] = [], r
        deltas[r.key] = {f: [] for f, _ in REFERENCES}
      values[r.key].append(v)
      for f, _ in REFERENCES:
        if r.entry.get(f) and r.entry[f].get("delta") is not None:
          deltas[r.key][f].append(r.entry[f]["delta"])
  out = []
  for key in order:
    v = values[key]
    r = first[key]
    out.append(
      {
        "name": r.label,
        "key": key,
        "arch": r.arch,
        "params": r.params,
        "n": len(v),
        "metric": metric.key,
        "mean": statistics.fmean(v),
        "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        "values": list(v),
      }
      | {f"deltas_{f}": deltas[key][f] for f, _ in REFERENCES}
    )
  return out


def aggregate_table(agg: list, metric: Metric) -> str:
  """Markdown of `aggregate`: mean ± std (a row only one run has: its value, "(one run)"; a
  row marked "shared", one model in every run: its value, "(one model, shared by N runs)"),
  delta vs the teacher's mean, or, for rows with over-seed comparisons (`vs_teacher`,
  `vs_baseline`: stats.over_seeds JSON added by report.aggregate), the mean per-seed paired
  Δ with its 95% t-interval, p and verdict; per-run values."""
  base = next((a["mean"] for a in agg if a["key"] == "Teacher"), None)
  paired = _comparison_columns(agg)
  compared = []
  for _, ref in paired:
    compared += [f"Δ vs {ref}, mean over seeds [95% CI]", "p", f"vs {ref}"]
  if not paired:
    compared = ["Δ vs teacher"]
  head = ["Model", "Arch", "Params", f"{metric.title} mean ± std"] + compared + ["Runs", "Per run"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for a in agg:
    if paired:
      cells = [c for f, _ in paired for c in comparison_cells(a.get(f))]
    else:
      cells = ["" if base is None or a["key"] == "Teacher" else f"{a['mean'] - base:+.2f}"]
    each = ", ".join(_fmt(v) for v in a["values"])
    if a.get("shared"):
      spread = f"{a['mean']:.2f} (one model, shared by {a['n']} runs)"
      each = _fmt(a["values"][0])
    elif a["n"] > 1:
      spread = f"{a['mean']:.2f} ± {a['std']:.2f}"
    else:
      spread = f"{a['mean']:.2f} (one run)"
    row = [a["name"], a["arch"], a["params"], spread] + cells + [str(a["n"]), each]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


DELTA_LEGEND = (
  "Δ vs teacher = row minus teacher, in the column's unit: positive = worse "
  "(lower is better), negative = better than the teacher."
)


def plural(n, word: str) -> str:
  """'1 epoch', '3 epochs': a count with its noun (an English -s plural)."""
  return f"{n} {word}" if n == 1 else f"{n} {word}s"


def data_sizes(spec) -> dict:
  """What results.json records of the data: {"unit", "train", "val", "test"} (a tasks.DataSpec)."""
  return {"unit": spec.unit, "train": spec.num_train, "val": spec.num_val, "test": spec.num_test}


def title(cfg, metric: Metric, seeds=None, data=None) -> str:
  """The heading of a results.md, from a config.Config.

  Args:
    cfg: the run's config.Config.
    metric: the headline metric.
    seeds: the base seeds of a multi-run summary (None: one run).
    data: `data_sizes` of the run (None: sizes unknown, e.g. an old results.json).

  Returns:
    A title line, a line with the data, epochs and seeds, and the table's legend.
  """
  what = metric.text or metric.key.replace("_", " ")
  head = (
    f"# {cfg.data_name}: {cfg.teacher_label} teacher -> {cfg.arch_for(1)} students, objective "
    f"{cfg.resolved_loss} (T={cfg.temperature})"
  )
  sizes = (
    f", {data['train']} train / {data['val']} val / {data['test']} test {data['unit']}"
    if data
    else ""
  )
  seed_text = f"seeds {', '.join(map(str, seeds))}" if seeds else f"seed {cfg.seed}"
  start = (
    f"; every generation's backbone starts from {cfg.init_weights} weights (not the paper's "
    "from-scratch BAN)"
    if cfg.init_weights
    else ""
  )
  # The CIFAR-style augmentations are the default and the paper's; the ImageNet-style one,
  # which also changes how the test images are cut, is named.
  aug = (
    "; Inception-style random-resized crop + flip, resize + centre-crop evaluation"
    if cfg.resolved_augment == "inception"
    else ""
  )
  setup = f"Data: {cfg.data_name}{sizes}{aug}; {plural(cfg.epochs, 'epoch')} per generation{start}; {seed_text}.\n\n"
  if seeds:
    return (
      f"{head}, seeds {', '.join(map(str, seeds))}\n\n{setup}Final-epoch {what}, mean ± std (ddof=1) "
      f"over runs; per-run tables in their own results.md. {DELTA_LEGEND}\n\n"
    )
  return f"{head}, seed {cfg.seed}\n\n{setup}Final-epoch {what}; no checkpoint selection. {DELTA_LEGEND}\n\n"


def _vs_cells(c: Optional[dict], fallback: Optional[float]) -> list:
  """`comparison_cells`, or the difference of means alone (`fallback`) without a paired comparison."""
  if c:
    return comparison_cells(c)
  return ["" if fallback is None else f"{fallback:+.2f}", "", ""]


def comparison_table(rows: list, metric: Metric) -> str:
  """Markdown of report.compare's rows: the headline (mean ± std over seeds, or one run's
  value), Δ vs the row's teacher with its 95% CI, p and verdict, Δ vs its Baseline, runs.

  A row without a paired comparison (no stored per-example outputs) shows the difference
  of means alone, and no p or verdict. A Teacher row that is one model of several runs
  (`shared_by`) is shown as `aggregate_table` shows one: "(one model, shared by N runs)",
  Runs = N.
  """
  means = {r["name"]: r["mean"] for r in rows}
  lines = [
    f"| Model | Arch | Params | {metric.title} | Δ vs teacher [95% CI] | p | Verdict "
    "| Δ vs baseline [95% CI] | p | Verdict | Runs |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    value = f"{r['mean']:.2f} ± {r['std']:.2f}" if r["n"] > 1 else f"{r['mean']:.2f}"
    runs = r["n"]
    if r.get("shared_by", 0) > 1:
      value, runs = f"{r['mean']:.2f} (one model, shared by {r['shared_by']} runs)", r["shared_by"]
    t = means.get(r.get("teacher")) if r["key"] != "Teacher" else None
    vs_t = _vs_cells(r.get("vs_teacher"), None if t is None else r["mean"] - t)
    base = next(
      (
        b["mean"]
        for b in rows
        if b["key"] == "Baseline"
        and b["run"] == r["run"]
        and r["key"] not in ("Teacher", "Baseline")
      ),
      None,
    )
    vs_b = _vs_cells(r.get("vs_baseline"), None if base is None else r["mean"] - base)
    cells = [r["name"], r["arch"], r["params"], value, *vs_t, *vs_b, str(runs)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
