"""One build stage in its own Python process: `python -m onnxforge.stage_process JOB` (store.run_stage starts it).

JOB is a pickle of (StageSpec, StageContext). The stage builds its folder as in doit's process; when it
fails, the exception is pickled beside JOB (`.error`) for the parent to raise, so a failure the build
reports in one line still reads as one line. Exit code 0: built; 1: failed.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    from . import families  # noqa: F401  the registry first, as in doit's process (plugin families import it)
    from .config import RecipeError
    from .sources import SourceError
    from .store import ValidationFailed, _build_stage

    job = Path(argv[0])
    spec, ctx = pickle.loads(job.read_bytes())
    try:
        _build_stage(spec, ctx, spec.out_dir(ctx.root), own_process=True)
    except (SourceError, ValidationFailed, RecipeError, FileNotFoundError, NotImplementedError) as exc:
        _send(job, exc)  # an expected failure: the parent reports it in one line
        return 1
    except Exception:
        traceback.print_exc()  # unexpected: the traceback is the useful part
        return 1
    return 0


def _send(job: Path, exc: BaseException) -> None:
    try:
        data = pickle.dumps(exc)
    except Exception:  # an exception that does not pickle: keep its type name and message
        data = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    job.with_suffix(".error").write_bytes(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
