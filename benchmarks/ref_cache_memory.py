"""Peak memory of ``train.py fit`` with the reference model in memory vs with cached reference log-probs.

Each measured run is its own process (peak RSS, ``ru_maxrss``, of a fit of a few steps, including the Python/torch
baseline); the cache is filled by a first run that is not measured. Model: a small Qwen2 (hidden 512, 8 layers) on
the bundled InterCode-SQL data, CPU fp32. Last line: ``ratio: <peak without cache / peak with cache>``.

    python benchmarks/ref_cache_memory.py [--steps 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import QUICKSTART, ROOT, small_qwen2  # noqa: E402


def fit(model: Path, workdir: Path, steps: int, cache: Path | None) -> float:
    """Peak RSS (MiB) of one ``train.py fit`` process."""
    args = [
        sys.executable, "-c",
        "import resource, sys; from hpl_lightning.cli import main; main(sys.argv[1:]); "
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
        "fit", f"--model.policy={model}", f"--data.train_path={QUICKSTART[0]}", "--data.batch_size=4",
        "--data.max_length=2048", f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={workdir}", f"--trainer.logger.init_args.save_dir={workdir}",
        f"--checkpoint.dirpath={workdir / 'ckpt'}", "--checkpoint.save_last=false",
        "--checkpoint.every_n_train_steps=0", "--trainer.enable_progress_bar=false",
    ] + ([f"--model.reference_cache={cache}"] if cache else [])
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    line = next(l for l in done.stdout.splitlines() if l.startswith("peak_rss_kib"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = small_qwen2(workdir / "model", hidden=512, layers=8)
        cache = workdir / "refcache"
        fit(model, workdir, 1, cache)  # fills the cache (reference computed once, then freed)
        without = fit(model, workdir, args.steps, None)
        with_cache = fit(model, workdir, args.steps, cache)
    print(f"peak RSS without cache (reference in memory): {without:.0f} MiB")
    print(f"peak RSS with cached reference log-probs: {with_cache:.0f} MiB")
    print(f"saved: {without - with_cache:.0f} MiB")
    print(f"ratio: {without / with_cache:.4f}")


if __name__ == "__main__":
    main()
