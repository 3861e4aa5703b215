"""Each kind of bad input is reported with its file and line; --on-error skip records it instead.
Empty documents are valid input (The Pile has them): counted and skipped, never an error."""
import json

import pytest

from ccmega.data import sample_data_dir
from data_helpers import mini_pile, read_documents, run_ccmega, small_sentencepiece, write_shard

def good_lines(n=6):
    docs = [d for d in read_documents(sample_data_dir() / "val.jsonl.zst") if d["meta"]["pile_set_name"] == "Pile-CC"]
    return [json.dumps(d).encode() for d in docs[:n]]


BAD_LINES = {
    "invalid JSON": (b'{"text": "unterminated, "meta": {"pile_set_name": "Pile-CC"}', "invalid JSON"),
    "missing text": (b'{"meta": {"pile_set_name": "Pile-CC"}}', "missing field 'text'"),
    "missing meta": (b'{"text": "hello"}', "missing field 'meta'"),
    "undecodable bytes": (b'{"text": "caf\xe9 \xff", "meta": {"pile_set_name": "Pile-CC"}}', "undecodable bytes"),
    "lone surrogate": (b'{"text": "a \\ud800 b", "meta": {"pile_set_name": "Pile-CC"}}', "undecodable text"),
}


def preprocess(shard, out, on_error):
    return run_ccmega("preprocess", "--input", str(shard), "--output", str(out), "--recipes", "D1",
                      "--tokenizer", str(small_sentencepiece()), "--tokens-per-dataset", "1B",
                      "--scarce-subset", "shrink",  # more than there is: takes all, once
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


def test_empty_documents_are_counted_and_skipped_not_errors(tmp_path):
    lines = good_lines()
    empties = [b'{"text": "", "meta": {"pile_set_name": "Pile-CC"}}',
               b'{"text": " \\n\\t ", "meta": {"pile_set_name": "Pile-CC"}}',
               b'{"text": "", "meta": {"pile_set_name": "DM Mathematics"}}',
               b'{"text": "", "meta": {"pile_set_name": "FreeLaw"}}']  # another subset: skipped as such
    for i, line in enumerate(empties):
        lines.insert(1 + 2 * i, line)
    shard = write_shard(tmp_path / "empty.jsonl.zst", lines)
    result = preprocess(shard, tmp_path / "out", "fail")
    assert result.returncode == 0, result.stderr
    assert "3 empty documents" in result.stderr
    manifest = json.loads((tmp_path / "out" / "D1" / "pretrain.manifest.json").read_text())
    assert manifest["tokenize"]["empty_documents"] == {"Pile-CC": 2, "DM Mathematics": 1}
    assert manifest["tokenize"]["skipped_subsets"] == {"FreeLaw": 1} and manifest["tokenize"]["errors_skipped"] == []
    assert manifest["subsets"]["Pile-CC"]["documents"] == manifest["sequences"] == len(lines) - len(empties)

    # Corrupt input is still an error beside them.
    broken = write_shard(tmp_path / "broken.jsonl.zst", lines + [b'{"text": "", "meta": {}}'])
    failed = preprocess(broken, tmp_path / "broken", "fail")
    assert failed.returncode == 1 and f"{broken}:{len(lines) + 1}: missing or non-string field" in failed.stderr
