"""`python tests/toy_cli.py ARGS` = `spheregen ARGS` with the toy plugin registered
(subprocess tests: kill and resume, exit codes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import toy_plugin  # noqa: E402

from spheregen import plugins  # noqa: E402
from spheregen.cli import main  # noqa: E402

plugins.set_registries(plugins.build_registries(extra=[("toy", toy_plugin)]))
sys.exit(main(sys.argv[1:]))
