"""Where the data lives: shards on node-local disk and their stage-outs, the run dir, the node and
job a file belongs to, the checks of a database, the merge, and reading the result."""
