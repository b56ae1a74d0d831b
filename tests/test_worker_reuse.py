"""What a reused trial worker keeps between trials: the teacher's tokenizer, read once per folder version."""

from __future__ import annotations

import os
import shutil

from kdplatform.distill.teacher import teacher_tokenizer


def test_the_teacher_tokenizer_is_read_once_per_folder_version(tmp_path, tiny_bert_dir):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, folder)
    first = teacher_tokenizer(folder)
    assert teacher_tokenizer(folder) is first, "the next trial of the same teacher reads it again"
    assert teacher_tokenizer(folder / ".." / "teacher") is first  # the same folder by another path
    assert first("a short sentence")["input_ids"][0] == first.cls_token_id

    # a teacher written anew under the same path (a new fine-tune, a replaced checkpoint) is read anew
    config = folder / "tokenizer_config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert teacher_tokenizer(folder) is not first
