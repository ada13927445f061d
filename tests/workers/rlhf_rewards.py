"""Rule-based rewards for the RLHF tests (``module:function`` reward functions)."""


def low_ids(prompts, responses, response_ids=None):
    """The share of response tokens that are ordinary tokens with an id below 100 (ids 0-4 are the
    special tokens, EOS among them, and count as unrewarded): a property a policy can learn fast,
    and not by ending the response early."""
    return [sum(5 <= t < 100 for t in ids) / max(len(ids), 1) for ids in response_ids]
