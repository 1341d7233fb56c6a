"""The conventions attention statistics are reported under (sb_eval.analysis.attention_stats),
standard library only, so that command lines can offer them without loading torch."""

# Where stick-breaking's remainder (the stick no key takes) goes in a distance.
REMAINDER_CONVENTIONS = ("ignore", "renormalize", "farthest")
REMAINDER_MEANING = {
    "ignore": "the stick's remainder sits at distance 0",
    "renormalize": "the weights are rescaled to sum to 1 (queries with an empty stick left out)",
    "farthest": "the remainder is placed on the farthest key the query sees",
}
# Which query positions of a forward pass are counted.
POSITIONS = ("all", "last")
POSITIONS_MEANING = {
    "last": "the last position of each window",
    "all": "every position of each window that sees at least one key",
}
SIGN_NOTE = (
    "tokens_back = query position - key position, in tokens (>= 0); the paper reports the "
    "signed distance key - query, i.e. -tokens_back"
)
