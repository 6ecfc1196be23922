"""blockfs's embedded NVMe/TCP target: a sans-IO core (`_queue`, `_controller`, `_subsystem`) and
a trio shell (`server`), with fault injection (`faults`, `control`) for the test suite.

Public API: `serve_target(config, *, task_status)`, `TargetConfig`, `SubsystemConfig`,
`TargetServer`, and `cli.main(argv)` (`blockfs target`, `python3 -m target`).
"""

from .config import DEFAULT_NQN, SubsystemConfig, TargetConfig
from .server import TargetServer, serve_target

__all__ = ["DEFAULT_NQN", "SubsystemConfig", "TargetConfig", "TargetServer", "serve_target"]
