"""Data, from file to batch, for any objective: read a source and check it against the objective's layout
(read, formats), the one truncation rule (truncation), the sequence a row's texts become (tokenize), the
declared arrow schema of tokenized rows (schema), split, mix and account for every row through the
objective's reader (sources), cache the result by content (cache), and sample and pad or pack it into
micro-batches (batching). scoring_tokenizer makes the tokenizer a model ships with give training's
sequence by itself. Imports nothing above `config`: the objective is handed in."""
