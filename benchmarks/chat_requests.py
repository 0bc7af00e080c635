"""The benchmark's chat requests: set A (`chats`, 64+ prompts of very different lengths, written for hf_paged) and
set B (`set_b_chats`, other prompts and lengths, to check that a result holds beyond set A)."""
from __future__ import annotations

QUESTIONS = [
    "What is 2 + 2?",
    "Name the planets of the solar system in order.",
    "Write a short poem about autumn leaves.",
    "Explain what a hash table is to a beginner.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the main causes of inflation?",
    "Describe how a bicycle works.",
    "Suggest a name for a bakery that sells only bread.",
    "What is the difference between weather and climate?",
    "Write a haiku about a cat sleeping in the sun.",
    "How do vaccines train the immune system?",
    "List five vegetables that grow well in cold climates.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What should I pack for a weekend hiking trip?",
]

ARTICLE = (
    "The city library reopened last spring after a two-year renovation. The old reading room, "
    "with its tall arched windows, now holds a children's section, a quiet study area and a small "
    "cafe run by volunteers. The architects kept the original oak shelves but added accessible "
    "ramps, brighter lighting and a rooftop garden where readers can sit in good weather. "
    "Visitors numbers doubled in the first month, and the library started evening classes in "
    "languages, computing and local history. The archive in the basement, which stores maps and "
    "newspapers going back to 1850, is being digitised so that anyone can search it online. "
)

SYSTEM = "You are a concise, friendly assistant. Answer clearly and stop when the answer is complete."


def chats() -> list[list[dict]]:
    """64 chats: bare questions, a system prompt, a long article as context, and a multi-turn chat."""
    out = []
    for i, q in enumerate(QUESTIONS):
        out.append([{"role": "user", "content": q}])
        out.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        context = ARTICLE * (1 + i % 4)  # ~130 to ~520 words of context
        out.append([{"role": "user", "content": f"Read this article:\n{context}\nNow answer: {q}"}])
        out.append([
            {"role": "user", "content": "Hi! I have a few questions today."},
            {"role": "assistant", "content": "Of course, ask me anything."},
            {"role": "user", "content": q},
        ])
    return out


_TASKS = ["Write a short poem about {}.", "Explain {} to a ten-year-old.", "Give three tips for {}.",
          "What are the pros and cons of {}?", "Summarize these notes in two sentences: {}",
          "Translate into French: {}", "Write a product description for {}.", "Tell a joke about {}."]
_WORDS = ("river mountain bicycle coffee library garden winter robot violin harbor desert lantern puzzle "
          "market thunder orchard museum compass rocket island kettle meadow bridge forest candle").split()


def set_b_chats(n: int) -> list[list[dict]]:
    """Set B: other prompts than chats(): short single-turn tasks, some with a note of 5-120
    random words, about half with a one-line system prompt; seeded, so every system gets the same."""
    import random

    rng = random.Random(1234)
    out = []
    for i in range(n):
        task = rng.choice(_TASKS)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 120) if "{}" in task and
                                                            task.startswith(("Summarize", "Translate")) else 2))
        msgs = [{"role": "system", "content": "You are a concise assistant."}] if i % 2 else []
        out.append(msgs + [{"role": "user", "content": task.format(words)}])
    return out
