"""The RESULTS/README row of a run of several seeds (config.num_models), from its workdir.

  python benchmarks/seeds_table.py WORKDIR [WORKDIR ...]

Per workdir: lanes, final val_accuracy mean +- std (and min-max), best val_accuracy over epochs
mean +- std, the ensemble's final and best val_accuracy, and the wall time of the epochs.
"""

import json
import pathlib
import statistics
import sys


def rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table_row(workdir: pathlib.Path) -> str:
  summary = rows(workdir / 'summary.jsonl')
  lanes = sorted((workdir / 'models').iterdir(), key=lambda p: int(p.name))
  histories = [rows(lane / 'metrics.jsonl') for lane in lanes]
  final = [h[-1]['val_accuracy'] for h in histories]
  best = [max(r['val_accuracy'] for r in h) for h in histories]
  ensemble = [r['ensemble_val_accuracy'] for r in summary]
  minutes = sum(r['seconds'] for r in summary) / 60
  return (f"| {workdir.name} | {len(lanes)} | {len(summary)} | "
          f"{statistics.mean(final):.4f} +- {statistics.stdev(final):.4f} "
          f"({min(final):.4f}-{max(final):.4f}) | "
          f"{statistics.mean(best):.4f} +- {statistics.stdev(best):.4f} | "
          f"{ensemble[-1]:.4f} | {max(ensemble):.4f} | {minutes:.0f} min |")


def main() -> None:
  print('| workdir | seeds | epochs | final val_accuracy | best val_accuracy | ensemble, final | '
        'ensemble, best | epochs\' time |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- |')
  for workdir in sys.argv[1:]:
    print(table_row(pathlib.Path(workdir)))


if __name__ == '__main__':
  main()
