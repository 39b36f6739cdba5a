"""`bitdance-rt` command line: generate images, export and build, calibrate, serve, plan and check.

main() parses (parser.py), then runs the command's function (one module per job: generate.py,
export.py, calibrate.py, serve.py, diagnose.py; what they share is common.py), printing every
error as one line. Importing this package imports no torch: each command imports what it needs
when it runs. The names below stay importable from `bitdance_rt.cli` as they were before the split.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from ..backends import BACKENDS, default_backend  # noqa: F401  (default_backend: used by tests)
from ..errors import BitDanceError
from .arguments import (
    CFG,
    MEMORY_CHECK_HELP,
    SCHEDULE_HELP,
    SEED,
    STEPS,
    _add_accelerator_args,
    _add_backend_args,
    _add_model_args,
    _add_precision_args,
    _add_renamed,
    _add_run_args,
    _add_t2i_args,
    _checked,
    _cuda_index,
    _port,
)  # noqa: F401
from .calibrate import _calibration_report, _capture_backend, cmd_calibrate  # noqa: F401
from .common import _check_output, _is_t2i, _model, _options, _pipeline, _t2i_checkpoint, default_labels  # noqa: F401
from .diagnose import cmd_check, cmd_plan
from .export import cmd_build, cmd_convert, cmd_export
from .generate import cmd_eval, cmd_generate
from .parser import _Parser, build_parser  # noqa: F401
from .serve import _api_key, cmd_serve, cmd_triton_repo  # noqa: F401


@contextlib.contextmanager
def _printed_logs():
    """While a command runs, what the library logs (logger `bitdance_rt`) is printed as bare lines, as
    the CLI prints its own: INFO (exports reused or made, variants, engines) to stdout, warnings and
    errors to stderr. Only this handler prints them (no propagation to the root logger, which a
    library such as ONNX Runtime's quantiser may have configured); put back as it was afterwards."""
    package = logging.getLogger("bitdance_rt")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    before = package.level, package.propagate
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        for handler in (out, err):
            package.removeHandler(handler)
        package.setLevel(before[0])
        package.propagate = before[1]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, already printed) or --help / --version
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with _printed_logs():
            return _run(args)
    except BitDanceError as exc:
        print(f"bitdance-rt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitdance-rt: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system said no (read-only, full, permission): one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"bitdance-rt: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    return {
        "generate": cmd_generate,
        "export": cmd_export,
        "eval": cmd_eval,
        "calibrate": cmd_calibrate,
        "convert": cmd_convert,
        "build": cmd_build,
        "check": cmd_check,
        "serve": cmd_serve,
        "triton-repo": cmd_triton_repo,
        "plan": cmd_plan,
    }[args.command](args)
