"""Rule-based rewards for the RLHF tests (``module:function`` reward functions)."""


def low_ids(prompts, responses, response_ids=None):
    """The share of response tokens whose id is below 100: a property a policy can learn fast."""
    return [sum(t < 100 for t in ids) / max(len(ids), 1) for ids in response_ids]
