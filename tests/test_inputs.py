"""How a stage finds its inputs: one walk of a plain folder, and a fingerprint of exactly what it reads."""
from ezoforge.curate.run import expand_inputs
from ezoforge.records import write_jsonl
from ezoforge.stage import input_files, input_fingerprints


def test_a_plain_folder_is_read_at_any_depth_and_fingerprinted_by_what_is_read(tmp_path):
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", [{"text": "一"}])
    write_jsonl(folder / "nested" / "deeper" / "b.jsonl.gz", [{"text": "二"}])
    (folder / "README.md").write_text("notes", encoding="utf-8")
    assert input_files([folder]) == [folder / "a.jsonl", folder / "nested" / "deeper" / "b.jsonl.gz"]
    assert expand_inputs([str(folder)]) == input_files([folder])  # curate walks the same way
    before = input_fingerprints([folder])
    (folder / "README.md").write_text("other notes", encoding="utf-8")  # not read: the same inputs
    assert input_fingerprints([folder]) == before
    write_jsonl(folder / "nested" / "deeper" / "b.jsonl.gz", [{"text": "二"}, {"text": "三"}])
    assert input_fingerprints([folder]) != before
