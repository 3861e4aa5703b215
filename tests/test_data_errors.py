"""Each kind of bad input is reported with its file and line; --on-error skip records it instead."""
import json

import pytest

from test_data_helpers import mini_pile, read_documents, run_ccmega, small_sentencepiece, write_shard

def good_lines(n=6):
    docs = [d for d in read_documents(mini_pile() / "val.jsonl.zst") if d["meta"]["pile_set_name"] == "Pile-CC"]
    return [json.dumps(d).encode() for d in docs[:n]]


BAD_LINES = {
    "invalid JSON": (b'{"text": "unterminated, "meta": {"pile_set_name": "Pile-CC"}', "invalid JSON"),
    "missing text": (b'{"meta": {"pile_set_name": "Pile-CC"}}', "missing field 'text'"),
    "missing meta": (b'{"text": "hello"}', "missing field 'meta'"),
    "undecodable bytes": (b'{"text": "caf\xe9 \xff", "meta": {"pile_set_name": "Pile-CC"}}', "undecodable bytes"),
    "lone surrogate": (b'{"text": "a \\ud800 b", "meta": {"pile_set_name": "Pile-CC"}}', "undecodable text"),
    "empty document": (b'{"text": "", "meta": {"pile_set_name": "Pile-CC"}}', "empty document"),
}


def preprocess(shard, out, on_error):
    return run_ccmega("preprocess", "--input", str(shard), "--output", str(out), "--recipes", "D1",
                      "--tokenizer", str(small_sentencepiece()), "--tokens-per-dataset", "1B",  # more than there is: takes all
                      "--finetune-samples", "0", "--test-samples", "0", "--workers", "1", "--quiet",
                      "--on-error", on_error, check=False)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_fails_with_file_and_line_or_is_skipped_and_recorded(tmp_path, case):
    line, reason = BAD_LINES[case]
    lines = good_lines()
    lines.insert(3, line)  # line 4 of the shard
    shard = write_shard(tmp_path / "bad.jsonl.zst", lines)

    failed = preprocess(shard, tmp_path / "fail", "fail")
    assert failed.returncode == 1
    assert f"{shard}:4: {reason}" in failed.stderr
    assert not list((tmp_path / "fail").glob("D1/*.bin"))

    skipped = preprocess(shard, tmp_path / "skip", "skip")
    assert skipped.returncode == 0, skipped.stderr
    manifest = json.loads((tmp_path / "skip" / "D1" / "pretrain.manifest.json").read_text())
    [error] = manifest["tokenize"]["errors_skipped"]
    assert error["file"] == str(shard) and error["line"] == 4 and error["reason"].startswith(reason)
    assert manifest["subsets"]["Pile-CC"]["documents"] == len(lines) - 1


def test_truncated_zstd_stream(tmp_path):
    whole = (mini_pile() / "val.jsonl.zst").read_bytes()
    shard = tmp_path / "cut.jsonl.zst"
    shard.write_bytes(whole[: len(whole) // 2])
    failed = preprocess(shard, tmp_path / "fail", "fail")
    assert failed.returncode == 1
    assert f"{shard}:" in failed.stderr and "truncated zstd stream" in failed.stderr
    line = int(failed.stderr.split(f"{shard}:")[1].split(":")[0])
    assert 1 < line < len(read_documents(mini_pile() / "val.jsonl.zst"))
