"""A resume on other training data (`Workdir.check_data`), shared by the trainers' tests:
config.json pins the flags, not the data they name (a data_dir may move, and another folder
may hold another version of the dataset)."""

import dataclasses
import os
from collections.abc import Callable

import pytest

from dpfed import data as data_lib
from dpfed.train.config import ConfigError
from dpfed.train.workdir import Workdir


def load_train_one_example_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes `dpfed.data.load` return every train split one example short (other splits
    as they are): other training data under the same flags."""
    load = data_lib.load

    def one_example_short(name, split, **kwargs):
        ds = load(name, split, **kwargs)
        if split != "train":
            return ds
        users = None if ds.user_ids is None else ds.user_ids[:-1]
        return dataclasses.replace(
            ds, images=ds.images[:-1], labels=ds.labels[:-1], user_ids=users)

    monkeypatch.setattr(data_lib, "load", one_example_short)


def assert_resume_on_other_data_is_refused(
    monkeypatch: pytest.MonkeyPatch, resume: Callable[[], object],
    workdir: str | os.PathLike, flag: str,
) -> None:
    """Checks that `resume()`, which resumes the run in `workdir`, is refused on training
    data one example short with a ConfigError naming `flag`, before it logs anything: its
    checkpoint and ledger must never continue on other data."""
    logged = Workdir(workdir).read_metrics()
    assert logged, f"the run to resume logged no metrics in {workdir}: nothing to compare"
    load_train_one_example_short(monkeypatch)
    with pytest.raises(ConfigError, match="differ from those of the run being resumed") as error:
        resume()
    assert error.value.field == flag, (
        f"the refusal must name --{flag}, the flag that chose the data, not "
        f"--{error.value.field}")
    after = Workdir(workdir).read_metrics()
    assert after == logged, (
        f"nothing may be trained or logged on the other data: {len(logged)} metrics "
        f"records before the refused resume, {len(after)} after")
