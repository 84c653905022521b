"""What every scheduler checks of a request: on the way in (``admit_checks``), and after each
token it samples (``check_stop``)."""

from __future__ import annotations

from modkit.request import Request, RequestStatus


def admit_checks(request: Request, requests: dict[str, Request], max_model_len: int) -> None:
    """What every scheduler checks of a new request (ValueError), and its ``max_tokens`` within the model's length."""
    if request.req_id in requests:
        raise ValueError(f"request id {request.req_id!r} is already in use")
    if request.num_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {request.num_tokens} tokens; the model's limit is {max_model_len} "
            "including at least one generated token"
        )
    # Counted from the prompt: a request moved here from another worker brings its outputs so far.
    request.max_tokens = min(
        request.sampling_params.max_tokens or max_model_len, max_model_len - request.num_prompt_tokens
    )


def check_stop(request: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """Whether ``token``, just appended, ends ``request``: eos or a stop token id (once ``min_tokens``
    are out), ``max_tokens``, or the model's length. A stop token id becomes the ``stop_reason``."""
    params = request.sampling_params
    num_output_tokens = request.num_output_tokens
    if num_output_tokens >= (params.min_tokens or 0):
        if token in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH_CAPPED
    return None
