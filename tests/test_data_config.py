"""Tests for DataConfig validation (lctx.data.config)."""

import dataclasses

import numpy as np
import pytest

from lctx.data import DataConfig


def test_defaults_are_valid_and_hashable():
  cfg = DataConfig()
  assert cfg.source == "stdlib" and cfg.paths == ()
  assert hash(cfg) == hash(DataConfig())
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.seq_len = 3


def test_paths_lists_become_tuples():
  cfg = DataConfig(source="text", paths=["a.txt", "b/*.txt"])
  assert cfg.paths == ("a.txt", "b/*.txt")
  assert DataConfig(source="text", paths="one.txt").paths == ("one.txt",)
  assert DataConfig(seq_len=np.int64(8)).seq_len == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "web"}, r"DataConfig\.source: unknown source 'web'"),
        ({"source": "jsonl"}, r"DataConfig\.paths: source 'jsonl' needs"),
        ({"source": "parquet", "paths": ("x",), "text_field": ""}, r"DataConfig\.text_field"),
        ({"tokenizer": ""}, r"DataConfig\.tokenizer"),
        ({"seq_len": 1}, r"DataConfig\.seq_len: must be >= 2, got 1"),
        ({"seq_len": 64.0}, r"DataConfig\.seq_len=.* must be int"),
        ({"seq_len": True}, r"DataConfig\.seq_len=.* must be int"),
        ({"batch_size": 0}, r"DataConfig\.batch_size: must be >= 1"),
        ({"eval_every_nth": 1}, r"DataConfig\.eval_every_nth: must be >= 2"),
        ({"long_fraction": 1.5}, r"DataConfig\.long_fraction: must be in \[0, 1\]"),
        ({"long_fraction": -0.1}, r"DataConfig\.long_fraction"),
        ({"seed": -1}, r"DataConfig\.seed: must be >= 0"),
        ({"piece_chars": -1}, r"DataConfig\.piece_chars: must be >= 0, got -1"),
        ({"piece_chars": 2.5}, r"DataConfig\.piece_chars=2\.5 must be int"),
    ],
)
def test_invalid_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DataConfig(**kwargs)


def test_piece_length_defaults_to_four_rows():
  assert DataConfig(seq_len=256).piece_length == 1024
  assert DataConfig(seq_len=256, piece_chars=300).piece_length == 300
