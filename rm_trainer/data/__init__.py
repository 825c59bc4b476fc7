"""Preference data, from file to batch: read and check every source (formats), truncate (truncation),
tokenize (tokenize), split, mix and account for every row (sources), cache the result by content
(cache), and cut it into micro-batches (batching). scoring_tokenizer makes the tokenizer a model ships with
give training's sequence by itself. Imports nothing above `config`."""
