"""Shared plumbing of the scripts: command lines and errors, files and owned outputs, devices and run
records, token files, the GPT-2 tokenizer, report tables and figures."""
