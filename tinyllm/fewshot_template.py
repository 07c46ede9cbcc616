"""The k-shot prompt template, in one place: the generated pretraining corpus
(tinyllm/icl_corpus.py) is written in it and the few-shot evaluation (tinyllm/fewshot.py)
prompts with it, so a model pretrained on the one is asked in the form it learned.

    {instruction}\\n              (only if there is one)
    {input}{output}\\n            one line per demonstration: the answer right after its input
    {query input}                the model continues with the answer and a newline

Why no separator such as "->" between input and answer: see the docstring of tinyllm/fewshot.py
(measured: 8-shot exact match 0.39 with "->", 0.91 without).
"""

SEPARATOR = ""  # between input and output on a demonstration line (none: see above)


def demo_line(record):
    """One demonstration. Example: {"input": "q", "output": "7"} -> "q7\\n"."""
    return f"{record['input']}{SEPARATOR}{record['output']}\n"


def instruction_line(instruction):
    """The instruction as the prompt's first line, or nothing. Example: "map it" -> "map it\\n"."""
    return instruction + "\n" if instruction else ""


def build_prompt(instruction, demos, query_input):
    """The k-shot prompt. Example: (None, [{"input": "a", "output": "x"}], "b") -> "ax\\nb"."""
    demonstrations = "".join(demo_line(d) for d in demos)
    return instruction_line(instruction) + demonstrations + query_input + SEPARATOR
