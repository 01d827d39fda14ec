"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go syntax, the system prompt, stops."""
from __future__ import annotations

import json

# Ollama's own templates for the chat formats our models use, picked by the marker tokens in the Jinja template.
TEMPLATES = {
    "<|im_start|>": (  # ChatML (SmolLM2, Qwen3)
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"),
    "<|start_header_id|>": (  # Llama 3.x
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "<start_of_turn>": (  # Gemma: no system role, so the system prompt opens the first user turn
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"system\" }}<start_of_turn>user\n{{ .Content }}\n\n"
        "{{- else if eq .Role \"user\" }}{{ if not (and (eq $i 1) (eq (index $.Messages 0).Role \"system\")) }}"
        "<start_of_turn>user\n{{ end }}{{ .Content }}<end_of_turn>\n{{ if $last }}<start_of_turn>model\n{{ end }}"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}"),
    "[INST]": (  # Mistral v0.3: the system prompt joins the last user turn
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"user\" }}[INST] {{ if and $last $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
        "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}"),
}


def modelfile(gguf_name: str, chat_template: str, system_prompt: str | None, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}", ""]
    template = next((t for marker, t in TEMPLATES.items() if marker in chat_template), None)
    if template is None:  # Ollama then reads the chat template embedded in the GGUF
        lines += ["# No Ollama template is known for this chat format; Ollama uses the one embedded in the GGUF.", ""]
    else:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system_prompt:
        lines += [f'SYSTEM """{system_prompt}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"
