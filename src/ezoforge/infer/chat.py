"""`ezo chat`: a streaming multi-turn REPL with /reset, /system TEXT and /exit."""
from __future__ import annotations

import sys

from ezoforge.completion import Completion
from ezoforge.infer.generate import ChatEngine, Sampling

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt, resets), /exit"


def repl(gen: ChatEngine, system: str | None, sampling: Sampling, read=input, write=sys.stdout.write) -> None:
    history: list[dict[str, str]] = []
    write(f"ezo chat — {gen.name}. {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            write("(conversation reset)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history.clear()
            write(f"(system prompt {'set' if system else 'removed'}; conversation reset)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = ""
        for piece in gen.stream(messages, sampling):
            if isinstance(piece, Completion):
                reply = piece.text
            else:
                write(piece)
                sys.stdout.flush()
        write("\n")
        history.append({"role": "assistant", "content": reply})
