"""The integer vocabulary of the synthetic tasks: the special markers and the content ranges, defined once.

The evaluation backbone is trained from scratch on these tasks, so there is no tokenizer: a token is an id.
Content ids come in disjoint ranges (keys, values, filler), so a needle's key or value never occurs by chance
in the haystack: every answer is recoverable from the statements that carry it, and from nothing else.
A question `QUERY key` ends on its key, and the needle it asks about goes on `key value...`: the first answer
token is the continuation of a token seen earlier (an induction copy, the retrieval circuit small transformers
learn first), and so is every later one.
"""

VOCAB_SIZE = 512

PAD = 0
BOS = 1
EOS = 2
NEEDLE = 3  # opens a needle: NEEDLE key value...
LET = 5  # a variable-tracking statement: LET source target (target takes source's value)
QUERY = 6  # opens the question at the end of the context; occurs exactly once per example

TASK_TOKENS = {
    "single_needle": 8,
    "multi_key_needle": 9,
    "multi_value_needle": 10,
    "variable_tracking": 11,
    "common_words": 12,
    "associative_recall": 13,  # training only
}

FIRST_CONTENT = 16
KEYS = range(FIRST_CONTENT, 144)  # needle keys and variable names
VALUES = range(144, 272)  # needle values and the values that variable chains start from
FILLER = range(272, VOCAB_SIZE)  # haystack filler, and the words of the aggregation task

# The long-decoding tasks of the paper-layout backbone (long_tasks.py, qa_documents.py). A 130-token answer uses
# 130 distinct ids and a document asks several questions, so they draw from ranges above VOCAB_SIZE: the tasks
# above keep their ids, and a backbone of LONG_VOCAB_SIZE serves both.
ASK = 512  # closes a block of questions: QUERY key key ... ASK
LONG_TASK_TOKENS = {"long_needle": 513, "qa_block": 514, "long_chain": 515, "qa_document": 516}
LONG_KEYS = range(528, 1040)  # keys and the tokens of variable names
LONG_VALUES = range(1040, 2048)  # needle values
LONG_VOCAB_SIZE = 2048
# The content ranges a needle task may draw its keys and values from (tasks.py's `vocabulary` option). The
# paper-layout backbone learns to copy on "long": copying learned on the short ranges did not carry over to ids
# it had never been trained to write (docs/evaluation.md, third backbone run).
# "long-swapped" draws keys from the long values and values from the long keys, so that copying also writes key ids
# (qa_block's next key, long_chain's names), which copying only values did not teach (fifth backbone run).
VOCABULARIES = {"short": (KEYS, VALUES), "long": (LONG_KEYS, LONG_VALUES), "long-swapped": (LONG_VALUES, LONG_KEYS)}
