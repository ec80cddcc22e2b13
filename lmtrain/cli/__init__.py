"""The `lmtrain` command and its subcommands (main.py dispatches; one module per command, each with
`main(argv=None)`), and the parsing of command lines and config files into the option dataclasses
(parsing.py). The top-level scripts (pretrain.py, sft.py, data_prep/*.py, ...) call these mains."""
