"""Plain English text the built-in models' byte-level BPE tokenizer is trained on (fixed, so builds are reproducible)."""

# Written for this project; a Python string rather than a data file so that it ships with the package
# without any package-data rule. Changing it changes every built-in tokenizer: bump BUILD_VERSION.
CORPUS = """\
The small computer sat on a shelf in the workshop, next to a box of screws and a cup of cold tea.
It had two cores, four gigabytes of memory and a fan that hummed when the day was warm. Every morning
the engineer turned it on, opened a terminal and asked it a question. Sometimes the answer was short.
Sometimes it was long, and the fan would spin faster while the words appeared one by one on the screen.

A chat service is a simple idea. A person writes a message, the service reads the whole conversation,
and a language model writes the next reply. The model does not remember anything by itself. The
service keeps the history of the conversation and sends it back to the model on every turn. If the
history grows without a limit, every turn takes a little longer than the one before, and the memory
of the machine slowly fills up. That is why a good service keeps only the last few turns and forgets
the rest, or writes a short summary of what was said before.

Memory is the first thing to watch on a small device. When a program asks for memory, the system
gives it pages. When the program frees the memory, the pages do not always go back to the system.
The allocator may keep them for later, and the resident size of the process stays high. A careful
service measures its memory after every turn, writes the numbers down, and raises an alert when the
line keeps going up for an hour. A graph that climbs slowly and never comes down is the sign of a leak.

The weather today is mild. In the morning there was fog over the river, and by noon the sun came out.
The wind is light from the west, and the evening will be clear and cool. Tomorrow may bring rain in
the afternoon, so take a coat if you go for a walk. Next week should be warmer, with long bright days
and short nights. Farmers hope for rain in the spring and for dry weather when the grain is ready.

Here is a recipe for a simple soup. Cut two onions, three carrots and a few potatoes into small
pieces. Warm some oil in a large pot and cook the onions until they are soft. Add the carrots, the
potatoes and one litre of water. Let it boil, then turn the heat down and wait for twenty minutes.
Add salt, pepper and a handful of fresh herbs. Serve it hot with bread and butter. It is even better
on the second day, when the flavours have had time to mix.

Numbers are easy to write: one, two, three, four, five, six, seven, eight, nine, ten. We can also
write them as digits: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 32, 64, 100, 128, 256, 512, 1024,
2048 and 4096. The year has 365 days, the day has 24 hours, and an hour has 60 minutes. A price may
be 3.50 or 12.99, and a share of 25% is one quarter. If you add 7 and 5 you get 12; if you take 9
from 20 you get 11; and if you multiply 6 by 8 you get 48.

Once upon a time there was a fox who lived at the edge of a forest. Every night she walked to the
village to look for food, and every morning she came back before the farmers woke up. One night the
moon was very bright, and a young dog saw her near the old well. "Who are you?" asked the dog. "I am
only a traveller," said the fox, "and I am very hungry." The dog thought for a while and then showed
her a basket of apples that had fallen from a tree. They became friends, and from that night on the
fox never had to steal again. Good stories often end like that: with a small kindness and a new friend.

Questions people ask a chat assistant are many and varied. How do I boil an egg? What is the capital
of France? Can you write a short poem about the sea? Why is the sky blue? How many legs does a spider
have? What time is it in Tokyo when it is noon in London? Please explain how a bicycle works. Could you
help me write a letter to my landlord? What should I cook for dinner tonight? Is it going to rain?

The sea is wide and grey in winter, blue and green in summer. Waves roll onto the sand and pull the
small stones back with a soft sound. Birds fly low over the water, looking for fish. A boat with a
white sail moves slowly along the coast, and the people on the beach wave to the sailors. At sunset
the water turns gold and then dark, and the lights of the harbour come on one after another.

To write good software, keep each part small and give it one job. Name things clearly. Test what you
build, and make the tests fail when the code is wrong. Measure before you make something faster, and
measure again after. Read the error messages; they often say exactly what went wrong. Write down the
decisions you make and the reasons for them, so that the next person does not have to guess. When a
service runs for a long time on a small machine, small mistakes add up, so check the logs and the
graphs every day.

A library is a quiet place full of books. Some books tell stories, some explain how the world works,
and some teach a skill, like painting, gardening or playing the piano. Children sit on the floor and
turn the pages of picture books. Students write notes at long tables. An old man reads the newspaper
by the window. The librarian knows where every book belongs and helps each visitor find what they need.

Thank you for your question. I am happy to help. Let me think about it step by step. First, we look
at what we know. Second, we decide what we want to find. Third, we check the answer and make sure it
makes sense. If something is not clear, please ask again, and I will try to explain it in another way.
Have a good day, and see you soon!
"""
