def render(e):
    return ""
