"""Run by tests/test_data_cache_ranks.py under torchrun: `gapfix train`'s data loading
(train_cli.join_process_group, then train_cli.load_data into OUT/data_cache), writing what this
rank loaded and how many records it tokenized itself to OUT/rank-RANK.json.

    data_cache_worker.py OUT DATA.jsonl

Records are counted at gapfix.data.encode_record, which the tokenizing map looks up at call time
(so counting leaves datasets' cache key alone): a rank that reads rank 0's cache counts none.
"""
import hashlib
import json
import os
import sys

import gapfix.data as gapfix_data
from gapfix.data import math_task
from gapfix.train_cli import data_cache_dir, join_process_group, load_data
from gapfix.trainer import leave_process_group


def main(out, data):
    rank = int(os.environ["RANK"])
    encoded = [0]
    encode = gapfix_data.encode_record

    def counting_encode(*args, **kwargs):
        encoded[0] += 1
        return encode(*args, **kwargs)

    gapfix_data.encode_record = counting_encode
    join_process_group("cpu")
    dataset, report = load_data(data, math_task.math_tokenizer(), cache_dir=data_cache_dir(out), max_length=60,
                                on_error="skip")
    table = dataset.with_format("arrow")[:len(dataset)]  # the rows kept (a filter may map indices)
    digest = hashlib.sha256()
    for column in ("prompt_ids", "answer_ids", "prompt_labels", "record"):
        digest.update(json.dumps(table.column(column).to_pylist()).encode())
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump({"encoded": encoded[0], "rows": len(dataset), "sha256": digest.hexdigest(),
                   "cache_files": sorted(entry["filename"] for entry in dataset.cache_files),
                   "fingerprint": dataset._fingerprint, "report": report}, handle)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
