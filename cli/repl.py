"""`skvrt chat`: a REPL that keeps the conversation, re-renders the chat template every turn and lets the
LLM prefill only what its cache lacks (after llama-cli / mlx-lm chat)."""

from __future__ import annotations

import sys

from skvrt.errors import SkvrtError

HELP = """commands:
  /exit, /quit   leave (also Ctrl-D, or Ctrl-C at the prompt)
  /clear         forget the conversation
  /regen         regenerate the last reply
  /stats         speed, memory and KV cache use of the last reply
  /help          this text
Ctrl-C while a reply streams stops the reply. End a line with \\ to continue on the next."""


class ChatREPL:
    def __init__(self, llm, system_prompt: str | None, max_tokens: int, sampling: dict,
                 out=sys.stdout, err=sys.stderr):
        self.llm = llm
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.messages: list[dict] = []
        self.out, self.err = out, err
        self.last = None

    def read_message(self) -> str | None:
        """One user message (lines ending in backslash continue); None at EOF / Ctrl-C."""
        lines = []
        prompt = ">>> "
        while True:
            try:
                line = input(prompt)
            except (EOFError, KeyboardInterrupt):
                print(file=self.err)
                return None
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "... "
                continue
            lines.append(line)
            return "\n".join(lines)

    def reply(self) -> None:
        parts: list[str] = []
        stream = self.llm.chat_stream(self.system + self.messages, self.max_tokens, **self.sampling)
        try:
            for r in stream:
                self.out.write(r.text)
                self.out.flush()
                parts.append(r.text)
                self.last = r
        except KeyboardInterrupt:  # arrived while printing, outside the generator
            stream.close()
            self.last = self.llm.last_stats
        finally:
            self.out.write("\n")
            self.out.flush()
        if self.last is not None and self.last.finish_reason in ("interrupted", None):
            print("[reply stopped]", file=self.err)
        elif self.last is not None and self.last.finish_reason == "context":
            print("[context full: /clear to start over]", file=self.err)
        self.messages.append({"role": "assistant", "content": "".join(parts)})

    def command(self, text: str) -> bool:
        """Handle a /command; returns False to leave the REPL."""
        cmd = text.strip().split()[0].lower()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/clear":
            self.messages.clear()
            self.llm.reset()
            print("[conversation cleared]", file=self.err)
        elif cmd == "/regen":
            if not self.messages or self.messages[-1]["role"] != "assistant":
                print("[nothing to regenerate]", file=self.err)
            else:
                self.messages.pop()
                self.reply()
        elif cmd == "/stats":
            from .main import print_stats

            if self.last is None:
                print("[no reply yet]", file=self.err)
            else:
                print_stats(self.last, self.llm, file=self.err)
        elif cmd == "/help":
            print(HELP, file=self.err)
        else:
            print(f"[unknown command {cmd}; /help lists them]", file=self.err)
        return True

    def loop(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("skvrt chat: /help for commands, Ctrl-C at the prompt or /exit to leave", file=self.err)
        while True:
            text = self.read_message()
            if text is None:
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.messages.append({"role": "user", "content": text})
            try:
                self.reply()
            except SkvrtError as e:  # e.g. the conversation no longer fits the context
                self.messages.pop()
                print(f"error: {e}", file=self.err)
