"""The arrow schema of every tokenized column, declared, and the one datasets.map that writes them.

`datasets` infers a column's type from the first batch its writer sees. A column that is empty in every
row of that batch (a side's own ids where no pair was cut, the ids of skipped malformed rows) is then
typed `list<null>`, and the first later batch that holds ids cannot be cast: a large file failed to
prepare depending on which rows its first thousand were. So every map that writes tokenized data
declares its output schema (`features`) and runs through `tokenize_map`: no column's type depends on the
rows a batch happens to hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rm_trainer.errors import UserError


def features(**columns: str):
    """A datasets.Features from short type names: int, float, bool, str, ids (a token-id list), ids2 (a
    list of token-id lists), ints, floats, floats2."""
    from datasets import Features, List, Value

    scalar = {"int": Value("int64"), "float": Value("float64"), "bool": Value("bool"), "str": Value("string")}
    nested = {"ids": List(Value("int64")), "ids2": List(List(Value("int64"))), "ints": List(Value("int64")),
              "floats": List(Value("float64")),
              "floats2": List(List(Value("float64")))}
    return Features({k: (scalar | nested)[t] for k, t in columns.items()})


def tokenize_map(ds, fn, schema, *, path: str, source_id: int, num_proc: int | None = None,
                 cache_file_name: str | None = None):
    """ds.map(fn) over whole batches of rows, writing `schema`'s columns (fn's output; every input column
    is removed). A user error (DataError) raised in a worker keeps its own message; any other exception
    is a bug and keeps its traceback, but the main process first names the file and source it was
    tokenizing."""
    name = Path(path).name or "rows"
    try:
        return ds.map(fn, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names,
                      features=schema, num_proc=num_proc if num_proc and num_proc > 1 else None,
                      desc=f"tokenizing {name}", cache_file_name=cache_file_name,
                      load_from_cache_file=False)  # reuse is cache.py's job, by content key, never implicit
    except UserError:
        raise
    except Exception as e:
        where = f"source {source_id} ({path or 'in memory'})"
        print(f"[rm_trainer] tokenizing {where} failed with {type(e).__name__}, which is not a data error "
              "rm_trainer knows: a bug; its traceback follows", file=sys.stderr, flush=True)
        e.add_note(f"while tokenizing {where}")
        raise
