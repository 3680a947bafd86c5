"""metrics.csv (always) and TensorBoard events (when a writer is installed)."""

import csv
import logging
import math
import os

log = logging.getLogger("lctx")

BASE_COLUMNS = ("kind", "step", "loss", "learning_rate", "grad_norm", "tokens_per_s",
                "eval_loss", "eval_ppl", "eval_accuracy")


class MetricsWriter:
  """Appends one CSV row per logged step ("train") or evaluation ("eval").

  On resume from checkpoint step `resume_step`, rows after that step (written by a run that was
  killed before its next checkpoint) are dropped, so the file of a resumed run equals the file of
  an uninterrupted one. Rows up to that step are never dropped or changed: when the resumed run
  logs other columns (another TrainConfig.position_buckets or sequence length gives other
  `ppl_pos_*` buckets), the header becomes the union, earlier columns first, and each row keeps
  its values, empty where it had no such column.
  """

  def __init__(self, workdir: str, extra_columns: tuple[str, ...], resume_step: int = 0,
               tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.csv")
    self.columns = BASE_COLUMNS + tuple(extra_columns)
    self._rewrite_kept_rows(resume_step)
    self._file = open(self.path, "a", newline="")
    self._csv = csv.DictWriter(self._file, fieldnames=self.columns)
    if self._file.tell() == 0:
      self._csv.writeheader()
      self._file.flush()
    self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard")) if tensorboard else None

  def _rewrite_kept_rows(self, resume_step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, newline="") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      header = tuple(reader.fieldnames or ())
    kept = [r for r in rows if _complete(r, header) and int(r["step"]) <= resume_step]
    if kept:  # extend, never shrink, the columns of a file that holds history
      self.columns = header + tuple(c for c in self.columns if c not in header)
    tmp = self.path + ".tmp"
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=self.columns)
      writer.writeheader()
      writer.writerows({c: r.get(c, "") for c in self.columns} for r in kept)
    os.replace(tmp, self.path)

  def write(self, kind: str, step: int, values: dict[str, float]) -> None:
    row = {"kind": kind, "step": step}
    row.update({k: _fmt(v) for k, v in values.items() if k in self.columns})
    self._csv.writerow(row)
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{kind}/{k}", v, step)
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


class NullMetricsWriter:
  """The writer of every process but 0 of a multi-process run: metrics come from process 0."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.csv")

  def write(self, kind: str, step: int, values: dict[str, float]) -> None:
    pass

  def close(self) -> None:
    pass


def _fmt(v):
  return repr(float(v)) if isinstance(v, float) else v


def _complete(row: dict, columns) -> bool:
  return (None not in row and row.get("step", "").isdigit()
          and row.get("kind") in ("train", "eval") and len(row) == len(columns))


def _tensorboard_writer(logdir: str):
  try:
    from tensorboardX import SummaryWriter  # optional dependency
  except ImportError:
    log.info("TensorBoard writer not installed (pip install tensorboardX); "
             "metrics go to metrics.csv only")
    return None
  return SummaryWriter(logdir)
