"""vLLM's /tokenize and /detokenize: a prompt (or messages, through the chat template) to token ids, and
back."""

from __future__ import annotations

from .errors import bad_request
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


class TokenizeService:
    def __init__(self, state, chat) -> None:
        self.state = state
        self.chat = chat  # the ChatService: it renders messages as chat completions do

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.chat.check_model(req.model)
        model = self.state.model
        tok = model.tokenizer
        if req.messages is not None:
            tools = self.chat.tool_plan(req.tools, None, None).tools
            kwargs = self.chat.template_kwargs(req.chat_template_kwargs)
            text = self.chat.render(self.chat.messages(req.messages), tools, kwargs,
                                    add_generation_prompt=req.add_generation_prompt,
                                    continue_final_message=req.continue_final_message)
            special = bool(req.add_special_tokens)
        else:
            text = req.prompt or ""
            special = req.add_special_tokens is not False
        ids = tok(text, add_special_tokens=special)["input_ids"]
        urls = self.chat.image_urls(req.messages) if req.messages is not None else []
        if urls:  # each image's placeholder as wide as the image, as the model reads it
            from .multimodal import BadImage

            try:
                ids, _ = model.images.prepare(ids, urls)
            except BadImage as exc:
                raise bad_request(f"{exc.param}: {exc}", exc.param) from None
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.chat.check_model(req.model)
        tok = self.state.model.tokenizer
        size = len(tok)
        for i, t in enumerate(req.tokens):
            if t >= size:
                raise bad_request(f"tokens.{i}: token id {t} is outside the vocabulary (0 to {size - 1})",
                                  f"tokens.{i}")
        return DetokenizeResponse(prompt=tok.decode(req.tokens))
