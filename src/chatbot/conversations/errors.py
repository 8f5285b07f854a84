from chatbot.errors import Conflict


class TooManyConversations(Conflict):
    code = "too_many_conversations"
