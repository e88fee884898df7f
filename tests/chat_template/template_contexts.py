"""Conversation contexts that every real chat template is rendered with, by minilora and by the oracle.

Each context is (messages, extra template variables). Together they reach what templates of the newest families
read: a system prompt, multi-turn history, reasoning in history (`reasoning_content`, `thinking`),
`enable_thinking`, tool definitions, assistant `tool_calls` with dict and JSON-string arguments, parallel calls,
`tool` replies, Korean text, content as a list of parts, `documents`, and the extra variables some templates read
(`reasoning_effort`, `builtin_tools`, `date_string`).
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C).",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": 'City name, e.g. "Seoul"'},
                "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"},
                "days": {"type": "integer", "description": "Forecast days"},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to search"},
                "filters": {"type": "array", "items": {"type": "string"}, "description": "Filters"},
                "options": {
                    "type": "object",
                    "properties": {"safe": {"type": "boolean"}, "limit": {"type": ["integer", "null"]}},
                    "description": "Options",
                },
            },
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER_TOOL, SEARCH_TOOL]
COHERE_TOOLS = [  # Command-R's own tool format (its tool_use template reads these keys)
    {
        "name": "internet_search",
        "description": "Returns a list of relevant document snippets for a textual query retrieved from the internet",
        "parameter_definitions": {"query": {"description": "Query to search the internet with", "type": "str",
                                            "required": True}},
    },
    {"name": "directly_answer", "description": "Calls a standard (un-augmented) AI chatbot",
     "parameter_definitions": {}},
]


def _turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def _call(name, arguments, call_id):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


_TOOL_DICT = [
    {"role": "user", "content": "What's the weather in Seoul?"},
    {"role": "assistant", "content": "",
     "tool_calls": [_call("get_weather", {"city": "Seoul", "days": 2}, "call0001")]},
    {"role": "tool", "tool_call_id": "call0001", "name": "get_weather", "content": "22°C, clear"},
    {"role": "assistant", "content": "It is 22°C and clear in Seoul."},
]
_TOOL_STRING = [
    {"role": "user", "content": "Weather in Busan?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", '{"city": "Busan"}', "call0002")]},
    {"role": "tool", "tool_call_id": "call0002", "name": "get_weather", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "25°C in Busan."},
]
_PARALLEL = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Seoul and news about it?"},
    {
        "role": "assistant",
        "content": "Let me check both.",
        "tool_calls": [
            _call("get_weather", {"city": "Seoul"}, "call0003"),
            _call("search", {"query": "Seoul news", "filters": ["today"]}, "call0004"),
        ],
    },
    {"role": "tool", "tool_call_id": "call0003", "name": "get_weather", "content": "20°C"},
    {"role": "tool", "tool_call_id": "call0004", "name": "search", "content": "Nothing new."},
    {"role": "assistant", "content": "20°C, and no news."},
    {"role": "user", "content": "Thanks!"},
]
_REASONING_HISTORY = [
    {"role": "system", "content": "Think step by step."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "Three plus three is six."},
]
_REASONING_TOOLS = [
    {"role": "user", "content": "Weather in Seoul?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should call the weather tool.",
        "tool_calls": [_call("get_weather", {"city": "Seoul"}, "call0005")],
    },
    {"role": "tool", "tool_call_id": "call0005", "name": "get_weather", "content": "18°C"},
    {"role": "assistant", "content": "18°C.", "reasoning_content": "The tool said 18."},
]
_KOREAN = _turns(
    ("system", "항상 한국어로 답하세요."),
    ("user", "안녕하세요? 오늘 날씨 어때요? 😀"),
    ("assistant", "안녕하세요! 맑습니다."),
    ("user", "고마워요 "),
)
_PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
    {"role": "user", "content": [{"type": "text", "text": "What is this? "}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
]
DOCUMENTS = [
    {"title": "Tall penguins", "text": "Emperor penguins are the tallest."},
    {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica."},
]

CONTEXTS = {  # name -> (messages, extra template variables)
    "plain": (_turns(("user", "Hello!")), {}),
    "system": (_turns(("system", "You answer in JSON."), ("user", "List two colors.")), {}),
    "multi_turn": (_turns(("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")), {}),
    "ends_with_assistant": (
        _turns(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6")),
        {},
    ),
    "reasoning_history": (_REASONING_HISTORY, {}),
    "reasoning_history_open": (_REASONING_HISTORY[:4], {}),
    "thinking_field": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "thinking": "Greet back."}],
        {},
    ),
    "enable_thinking": (_REASONING_HISTORY[:4], {"enable_thinking": True}),
    "disable_thinking": (_turns(("user", "Quick: capital of France?")), {"enable_thinking": False}),
    "tool_definitions": (_turns(("user", "Weather in Seoul?")), {"tools": TOOLS}),
    "tools_with_system": (_turns(("system", "Use tools wisely."), ("user", "Weather in Busan?")), {"tools": TOOLS}),
    "tool_calls_dict": (_TOOL_DICT, {"tools": TOOLS}),
    "tool_calls_json_string": (_TOOL_STRING, {"tools": TOOLS}),
    "parallel_calls": (_PARALLEL, {"tools": TOOLS}),
    "tool_reply_last": (_TOOL_DICT[:3], {"tools": TOOLS}),
    "reasoning_tools": (_REASONING_TOOLS, {"tools": TOOLS, "enable_thinking": True}),
    "korean": (_KOREAN, {}),
    "content_parts": (_PARTS, {}),
    "documents": (_turns(("user", "Which penguins are tallest?")), {"documents": DOCUMENTS}),
    "cohere_style_tools": (_turns(("user", "Whats the biggest penguin in the world?")), {"tools": COHERE_TOOLS}),
    "functions_role": (  # firefunction-v1's format: the tool definitions as a "functions" message
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "functions", "content": '[{"name": "get_weather", "parameters": {"city": "string"}}]'},
            {"role": "user", "content": "Weather in Seoul?"},
            {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", '{"city": "Seoul"}', "c6")]},
            {"role": "tool", "tool_call_id": "c6", "name": "get_weather", "content": "21°C"},
        ],
        {},
    ),
    "template_options": (
        _turns(("user", "Search the web for minilora")),
        {
            "builtin_tools": ["brave_search", "wolfram_alpha"],
            "date_string": "09 Mar 2025",
            "reasoning_effort": "high",
            "tools": TOOLS,
        },
    ),
}
