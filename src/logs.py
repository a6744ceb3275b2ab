"""Logging setup (run.log + console on the main rank) and metric writers (tensorboard on the main rank only)."""

import logging
import sys
from pathlib import Path


def setup_logging(is_main: bool, log_file: Path | None = None) -> None:
    """INFO on the main rank (console and `log_file`), WARNING elsewhere. Call once per process."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricWriter:
    """Scalars to tensorboard event files in `directory` (main rank); a silent no-op object elsewhere."""

    def __init__(self, directory: Path | None) -> None:
        self.writer = None
        if directory is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                logging.getLogger(__name__).warning("tensorboard is not installed: no event files are written")
            else:
                self.writer = SummaryWriter(str(directory))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
