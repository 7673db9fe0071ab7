"""Records in, training batches out.

- `sources`: `read_source` (.json, .jsonl, .parquet, saved `datasets` folders);
- `paths`: paths checked before anything reads them (devices, pipes, broken links, plain folders);
- `records`: `read_records`, `DataError` (validation naming file, line and field), the format names;
- `strict_json`: JSON without NaN, Infinity or a key given twice (data, options files, requests);
- `formats`: `load_data`, OpenAI / ShareGPT / Alpaca records into this project's records;
- `splitting`: `--val_size` hold-outs and the converters' splits;
- `encoding`: `encode_record`, `IGNORE_INDEX`, `LengthLimits`, the sanity check;
- `training_data`: `load_split`, tokenized and cached `datasets`, truncation counted;
- `packing` and `collation`: records into rows, and rows into batches;
- `converters`: AdvertiseGen and ToolAlpaca into the two training formats.
"""
