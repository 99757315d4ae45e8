"Build an nbdev notebook from a cell file: cells start with '#%% md', '#%% code' or '#%% params'."
import sys, re, nbformat
src, out = sys.argv[1], sys.argv[2]
text = open(src).read()
parts = re.split(r"^#%% (md|code|params)[ \t]*\n", text, flags=re.M)
nb = nbformat.v4.new_notebook()
nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
for kind, body in zip(parts[1::2], parts[2::2]):
    body = body.strip("\n")
    if kind == "md": nb.cells.append(nbformat.v4.new_markdown_cell(body))
    else:
        c = nbformat.v4.new_code_cell(body)
        if kind == "params": c.metadata["tags"] = ["parameters"]
        nb.cells.append(c)
nbformat.write(nb, out)
print(len(nb.cells), "cells ->", out)
