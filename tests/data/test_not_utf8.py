# SPDX-License-Identifier: Apache-2.0
"""A file that is not UTF-8 (a stray binary under data.sources, a config saved in another encoding) gets the
same one-line `file:line` message and exit code 2 as a malformed line, in every reader, and `data.on_error:
skip` skips such lines like any other bad line."""
import json

import pytest

from ms_llm.cli import main
from ms_llm.data.readers import ReadStats, read_records
from ms_llm.errors import MsLlmError
from ms_llm.fileio import read_text

BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" + bytes(range(256))


@pytest.fixture
def binary(tmp_path):
    path = tmp_path / "stray.bin"
    path.write_bytes(BINARY)
    return str(path)


def _cases(binary):
    src = lambda fmt: f"data.sources=[{{path: {binary}, format: {fmt}}}]"          # noqa: E731
    quiet = ["train.progress_bar=false", "log.plots=false"]
    return {
        "pretrain text": ["train", "configs/tiny/pretrain.yaml", src("text"), "train.output_dir=runs/bin_pt", *quiet],
        "sft": ["train", "configs/tiny/sft_lora.yaml", src("alpaca"), "train.output_dir=runs/bin_sft", *quiet],
        "preference": ["train", "configs/tiny/reward.yaml", src("preference"), "train.output_dir=runs/bin_rm", *quiet],
        "prompts (eval em)": ["eval", "em", "--model", "runs/tiny_pretrain", "--data", binary],
        "multiple choice": ["eval", "mc", "--model", "runs/tiny_pretrain", "--data", binary, "--layout", "jsonl"],
        "perplexity": ["eval", "ppl", "--model", "runs/tiny_pretrain", "--data", binary],
        "humaneval samples": ["eval", "humaneval", "--samples", binary],
        "config": ["train", binary],
        "pipeline": ["pipeline", binary],
    }


@pytest.mark.parametrize("case", ["pretrain text", "sft", "preference", "prompts (eval em)", "multiple choice",
                                  "perplexity", "humaneval samples", "config", "pipeline"])
def test_a_binary_input_is_one_line_naming_it_and_exit_2(tiny_pretrained, monkeypatch, capsys, binary, case):
    monkeypatch.chdir(tiny_pretrained)
    assert main(_cases(binary)[case]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"{binary}:1: " in lines[0] and "not UTF-8" in lines[0], lines[0]


def test_on_error_skip_skips_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(3)]
    path.write_bytes(good[0] + b'{"text": "caf\xe9"}\n' + good[1] + BINARY + b"\n" + good[2])
    with pytest.raises(MsLlmError, match=r"mixed.jsonl:2: not UTF-8 text \(byte 32 is e9"):
        read_records(str(path), "text")
    stats = ReadStats()
    records = read_records(str(path), "text", on_error="skip", stats=stats)
    assert [r["text"] for r in records] == ["line 0", "line 1", "line 2"]
    assert stats.skipped >= 2 and all("not UTF-8" in r for r in stats.reasons[:2])


def test_read_text_names_the_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"stage: pretrain\ntrain:\n  output_dir: caf\xe9\n")
    with pytest.raises(MsLlmError, match=r"cfg.yaml:3: config is not UTF-8 text \(byte 40 is e9"):
        read_text(str(path), "config")
